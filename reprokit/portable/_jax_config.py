"""Restore a recorded jax config: the one implementation, shared by reprokit and replay.py.

An archive records every jax config value in force when the bug happened,
because precision, x64, PRNG and promotion settings change the bits a layer
computes. A replay re-applies the entries that describe the computation, not
the machine, and reports the rest. This module decides which entries those
are and applies them; `reprokit run` and the archive's standalone `replay.py`
both call `apply_jax_config`, so they restore exactly the same config and
report the same problems (this file is embedded verbatim into `replay.py`).

The recorded config comes from an untrusted archive: only options on a fixed,
reviewed list are ever applied, values are decoded by jax's own option types
(enum by name, never eval), and every name or value printed back is clipped.

It also holds the placeholders the packer writes in place of private text
(`<home>`, `<path>`...): replay must recognise them, and this is the one place
both sides can import. Imports only the standard library (and jax, lazily).
"""

from __future__ import annotations

import enum
import re
from typing import Any

HOME_PLACEHOLDER = "<home>"
USER_PLACEHOLDER = "<user>"
HOST_PLACEHOLDER = "<host>"
REDACTED_PLACEHOLDER = "<redacted>"
PATH_PLACEHOLDER = "<path>"
UUID_PLACEHOLDER = "<uuid>"
PLACEHOLDER = re.compile(r"<(?:home|user|host|redacted|path|uuid)>")


def looks_like_path(value: str) -> bool:
    """Whether a recorded string names a file or folder (of the packing machine)."""
    return "/" in value or "\\" in value or value.startswith("~")


# Config options describing the machine or the tooling around a run rather
# than the computation: replaying them would point at the packer's caches,
# devices or cluster, or just change logging. Never applied, and not worth a
# line in the verdict when they differ.
_MACHINE_CONFIG = re.compile(
    r"cache|platform|backend|visible_devices|num_cpu_devices|default_device|mock_"
    r"|pjrt|client|distributed|coordinator|cross_host|share_binary|preemption"
    r"|recoverability|topology|collectives|timeout|address|socket|host"
    r"|log|dump|profil|pgle|traceback|pprint|color|source_url|source_file"
    r"|transfer_guard|garbage_collection_guard|thread_guard|proxy|leaked_clients"
    r"|captured_constants|_dir$|_path$|_file$|_to$"
)
# The only config options a replay applies: each changes what is traced,
# compiled or computed, takes a bool, number or named choice, and was checked to
# neither write files nor reach the network. The recorded config comes from an
# untrusted archive, so an option a later jax adds is reported, not applied,
# until it is reviewed and listed here.
_REPLAYED_CONFIG = frozenset(
    {
        "check_vma",
        "eager_constant_folding",
        "jax_allow_f16_reductions",
        "jax_auto_pcast",
        "jax_bcoo_cusparse_lowering",
        "jax_check_static_indices",
        "jax_check_tracer_leaks",
        "jax_compiler_enable_remat_pass",
        "jax_custom_vjp3",
        "jax_debug_infs",
        "jax_debug_key_reuse",
        "jax_debug_nans",
        "jax_default_matmul_precision",
        "jax_default_prng_impl",
        "jax_disable_bwd_checks",
        "jax_disable_jit",
        "jax_disable_most_optimizations",
        "jax_disable_vmap_shmap_error",
        "jax_disallow_mesh_context_manager",
        "jax_dynamic_shapes",
        "jax_embedded_constants_max_bytes",
        "jax_enable_checks",
        "jax_enable_custom_prng",
        "jax_enable_x64",
        "jax_error_checking_behavior_divide",
        "jax_error_checking_behavior_nan",
        "jax_error_checking_behavior_oob",
        "jax_exec_time_optimization_effort",
        "jax_experimental_unsafe_xla_runtime_errors",
        "jax_explicit_x64_dtypes",
        "jax_high_dynamic_range_gumbel",
        "jax_legacy_prng_key",
        "jax_memory_fitting_effort",
        "jax_memory_fitting_level",
        "jax_mosaic_allow_hlo",
        "jax_mutable_array_checks",
        "jax_no_execution",
        "jax_no_tracing",
        "jax_numpy_dtype_promotion",
        "jax_numpy_rank_promotion",
        "jax_optimization_level",
        "jax_pallas_enable_debug_checks",
        "jax_pallas_poison_buffers",
        "jax_pallas_use_mosaic_gpu",
        "jax_pallas_verbose_errors",
        "jax_ragged_dot_use_gpu_pallas_triton_lowering",
        "jax_ragged_dot_use_ragged_dot_instruction",
        "jax_random_seed_offset",
        "jax_refs_to_pins",
        "jax_remat3",
        "jax_remove_size_one_mesh_axis_from_type",
        "jax_scan3",
        "jax_softmax_custom_jvp",
        "jax_threefry_gpu_kernel_lowering",
        "jax_threefry_partitionable",
        "jax_use_direct_linearize",
        "jax_use_emit_pipeline_primitive",
        "jax_use_magma",
        "jax_use_shardy_partitioner",
        "jax_use_simplified_jaxpr_constants",
    }
)


def _config_part(recorded: dict[str, Any]) -> dict[str, Any]:
    # Accept a whole snapshot as well as its "jax_config" part.
    inner = recorded.get("jax_config")
    return inner if isinstance(inner, dict) else recorded


def _describes_machine(name: str, value: Any) -> bool:
    if _MACHINE_CONFIG.search(name):
        return True
    return isinstance(value, str) and (
        looks_like_path(value) or value in (PATH_PLACEHOLDER, REDACTED_PLACEHOLDER)
    )


def restorable_config_items(recorded: dict[str, Any]) -> dict[str, Any]:
    """Return the recorded jax config entries a replay should apply, in order.

    `recorded` is a snapshot from `capture_environment` or its `jax_config`
    part. Only options on reprokit's reviewed list of computation settings
    are kept (precision, x64, PRNG, promotion, debug checks, optimization
    levels, ...), and not those whose value is path-like or had private text
    removed; machine settings (caches, platforms, logging, dumps, cluster)
    never are. `jax_enable_x64` comes first: arrays decoded before it is set
    are silently truncated to 32 bits. Values are in recorded (JSON) form.
    """
    config = _config_part(recorded)
    items = {
        name: value
        for name, value in config.items()
        if name in _REPLAYED_CONFIG and not _describes_machine(name, value)
    }
    if "jax_enable_x64" in items:
        items = {"jax_enable_x64": items.pop("jax_enable_x64"), **items}
    return items


def unreviewed_config_items(recorded: dict[str, Any]) -> dict[str, Any]:
    """Return the recorded entries that are neither reviewed nor machine settings.

    A replay never applies them, but reports those that differ here, so the
    verdict's reader knows they could matter. Values are in recorded form.
    """
    config = _config_part(recorded)
    return {
        name: value
        for name, value in config.items()
        if isinstance(name, str)
        and name not in _REPLAYED_CONFIG
        and not _describes_machine(name, value)
    }


class _NotRestorable(Exception):
    pass


def _decode_config_value(name: str, value: Any, current: Any, meta: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        raise _NotRestorable("recorded without its value")
    if isinstance(value, str) and PLACEHOLDER.search(value):
        raise _NotRestorable(f"value {value!r} had private text removed when packed")
    entry = meta.get(name)
    enum_class = None
    if entry is not None and entry[0] == "enum_class":
        enum_class = entry[2].get("enum_class")
    if enum_class is None and isinstance(current, enum.Enum):
        enum_class = type(current)
    if enum_class is not None and value is not None:
        # Recorded by name; older archives or hand edits may hold the value.
        if isinstance(value, str) and value in enum_class.__members__:
            return enum_class[value]
        try:
            return enum_class(value)
        except ValueError as error:
            raise _NotRestorable(f"invalid value {value!r}") from error
    if isinstance(current, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError as error:
            raise _NotRestorable(f"invalid value {value!r}") from error
    return value


def apply_jax_config(recorded: dict[str, Any]) -> list[str]:
    """Apply recorded jax config values that differ here; report what could not be.

    Uses `restorable_config_items` to pick entries (so machine settings are
    skipped and `jax_enable_x64` goes first), converts enum options back to
    their enum instances and calls `jax.config.update` for every value that
    differs from the current one. Never raises for a bad entry: returns one
    human-readable line per entry that is unknown to this jax version, whose
    value was refused, or that differs here but is not on the reviewed list
    (so was not applied). Call it before decoding any array.
    """
    import jax

    meta = getattr(jax.config, "meta", {})
    problems: list[str] = []
    reviewed = restorable_config_items(recorded)
    # Unreviewed options go through the same checks, to be reported when they
    # could matter, but are never applied.
    for name, value in {**reviewed, **unreviewed_config_items(recorded)}.items():
        # The archive chose these names and values: keep each line short.
        entry = f"{name[:80]}={_clipped_repr(value)}"
        if name not in jax.config.values:
            problems.append(f"jax config {entry}: unknown to jax {jax.__version__}, not applied")
            continue
        current = jax.config.values[name]
        try:
            wanted = _decode_config_value(name, value, current, meta)
        except _NotRestorable as error:
            if name in reviewed:
                problems.append(f"jax config {name}: {error}, not applied")
                continue
            wanted = value
        if type(wanted) is type(current) and wanted == current:
            continue
        if name not in reviewed:
            problems.append(
                f"jax config {entry}: not on reprokit's list of options a replay applies"
                " (set it by hand to try it), not applied"
            )
            continue
        try:
            jax.config.update(name, wanted)
        except Exception as error:  # any refusal is reported
            problems.append(
                f"jax config {entry}: refused by jax {jax.__version__}"
                f" ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
            )
    return problems


def _clipped_repr(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
