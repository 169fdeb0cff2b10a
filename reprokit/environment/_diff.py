"""Say how the environment a bug was packed in differs from the one replaying it.

A replay that does not reproduce is often explained by a different jax,
jaxlib or XLA, another device kind or a numerics config option; the verdict
lists these differences first, marked as able to change numerical results,
and `reprokit env` prints the full table. Also the short summary of one
snapshot that `inspect`, the archive's README and the issue text show.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from reprokit.environment._snapshot import _PLUGIN_PACKAGES

__all__ = [
    "ABSENT",
    "EnvDifference",
    "diff_environments",
    "format_environment_summary",
    "format_environment_table",
]

# Recorded in `EnvDifference` for a field one snapshot lacks. A string rather
# than a private object so differences stay JSON-safe for reports; `None` is
# taken (it is a real config value, e.g. jax_default_matmul_precision).
ABSENT = "(absent)"

# jax config options recorded here change what a computation returns (or
# whether it raises). They drive `EnvDifference.version_sensitive` and the
# summary; the values are jax's defaults (0.4.3x to 0.10), in recorded form,
# used only to decide what the summary calls "non-default".
_NUMERICS_DEFAULTS: dict[str, Any] = {
    "jax_enable_x64": False,
    "jax_default_matmul_precision": None,
    "jax_threefry_partitionable": True,
    "jax_default_prng_impl": "threefry2x32",
    "jax_enable_custom_prng": False,
    "jax_legacy_prng_key": "ALLOW",
    "jax_random_seed_offset": 0,
    "jax_high_dynamic_range_gumbel": False,
    "jax_threefry_gpu_kernel_lowering": False,
    "jax_numpy_dtype_promotion": "STANDARD",
    "jax_numpy_rank_promotion": "allow",
    "jax_explicit_x64_dtypes": "WARN",
    "jax_allow_f16_reductions": True,
    "jax_softmax_custom_jvp": False,
    "jax_disable_jit": False,
    "jax_debug_nans": False,
    "jax_debug_infs": False,
    "jax_error_checking_behavior_nan": "ignore",
    "jax_error_checking_behavior_divide": "ignore",
    "jax_error_checking_behavior_oob": "ignore",
    "jax_optimization_level": "UNKNOWN",
    "jax_exec_time_optimization_effort": 0.0,
    "jax_disable_most_optimizations": False,
    "jax_use_magma": "auto",
    "jax_use_shardy_partitioner": True,
}
_NUMERICS_CONFIG = frozenset(_NUMERICS_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class EnvDifference:
    """One field that differs between the recorded and the current environment.

    `field` is dotted (`packages.jax`, `backend.platform`,
    `jax_config.jax_enable_x64`, `env_vars.XLA_FLAGS`, `xla_flags`);
    `recorded`/`current` hold the snapshot values, `ABSENT` where one side
    lacks the field. `version_sensitive` marks differences known to change
    numerical results: versions of python, jax, jaxlib, penzai, numpy,
    ml_dtypes and accelerator plugins, platform and device kind, numerics
    config and XLA flags.
    """

    field: str
    recorded: Any
    current: Any
    version_sensitive: bool


def _flatten(env: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in env.items():
        if isinstance(value, dict):
            for inner_key, inner_value in value.items():
                flat[f"{key}.{inner_key}"] = inner_value
        else:
            flat[key] = value
    return flat


_SENSITIVE_FIELDS = frozenset(
    {
        "python",
        "python_implementation",
        "packages.jax",
        "packages.jaxlib",
        "packages.penzai",
        "packages.numpy",
        "packages.ml_dtypes",
        "backend.platform",
        "backend.device_kind",
        "backend.platform_version",
        "xla_flags",
        "env_vars.XLA_FLAGS",
        "env_vars.LIBTPU_INIT_ARGS",
        "env_vars.NVIDIA_TF32_OVERRIDE",
    }
    | {f"jax_config.{name}" for name in _NUMERICS_CONFIG}
    | {f"env_vars.{name.upper()}" for name in _NUMERICS_CONFIG}
    | {f"packages.{name}" for name in _PLUGIN_PACKAGES}
)


def diff_environments(recorded: dict[str, Any], current: dict[str, Any]) -> list[EnvDifference]:
    """Compare two snapshots field by field.

    Nested sections (`packages`, `backend`, `jax_config`, `env_vars`) are
    compared entry by entry, lists as a whole. Returns version-sensitive
    differences first, then the rest, each group sorted by field name.
    """
    old = _flatten(recorded)
    new = _flatten(current)
    diffs = []
    for field in old.keys() | new.keys():
        before = old.get(field, ABSENT)
        after = new.get(field, ABSENT)
        if before == after and type(before) is type(after):
            continue
        diffs.append(EnvDifference(field, before, after, field in _SENSITIVE_FIELDS))
    diffs.sort(key=lambda d: (not d.version_sensitive, d.field))
    return diffs


def _cell(value: Any, width: int = 60) -> str:
    if isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, list):
        text = " ".join(str(v) for v in value) if value else "[]"
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_environment_table(diffs: list[EnvDifference]) -> str:
    """Render differences as an aligned plain-text table `field | recorded | here`.

    Version-sensitive fields are marked with `*`, explained in a last line.
    """
    if not diffs:
        return "The environment matches the recorded one."
    rows = [
        (d.field + (" *" if d.version_sensitive else ""), _cell(d.recorded), _cell(d.current))
        for d in diffs
    ]
    header = ("field", "recorded", "here")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(row: tuple[str, str, str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))

    lines = [line(header), "-+-".join("-" * width for width in widths)]
    lines += [line(row).rstrip() for row in rows]
    if any(d.version_sensitive for d in diffs):
        lines.append("* may change numerical results")
    return "\n".join(lines)


def format_environment_summary(env: dict[str, Any]) -> str:
    """Describe a snapshot in a few lines: Python, key versions, devices, numerics."""
    packages = env.get("packages") or {}
    backend = env.get("backend") or {}
    config = env.get("jax_config") or {}
    lines = [
        f"Python {env.get('python', '?')} ({env.get('python_implementation', '?')})"
        f" on {env.get('os', '?')} {env.get('machine', '?')}",
        ", ".join(
            f"{name} {packages.get(name) or 'not installed'}"
            for name in ("jax", "jaxlib", "penzai", "numpy")
        ),
    ]
    if backend.get("platform"):
        lines.append(
            f"backend {backend['platform']}: {backend.get('device_count', '?')} x "
            f"{backend.get('device_kind', '?')}, {backend.get('process_count', '?')} process(es)"
        )
    else:
        lines.append(f"backend unavailable: {backend.get('error', 'unknown error')}")
    changed = [
        f"{name}={config[name]!r}"
        for name, default in _NUMERICS_DEFAULTS.items()
        if name in config and config[name] != default
    ]
    lines.append("numerics config: " + (", ".join(changed) if changed else "jax defaults"))
    flags = env.get("xla_flags") or []
    if flags:
        lines.append("XLA_FLAGS: " + " ".join(flags))
    return "\n".join(lines)
