"""Loading an archive for replay, replaying it, and reporting what was measured.

The pipeline's back half, archive -> decode -> replay: open and validate the
container, check the manifest, restore the recorded jax configuration
(x64 before any array exists), decode the structure under the allow-list
with arrays read straight into aligned buffers, call the layer in the
recorded mode, and judge the outcome against the recorded signature.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from reprokit._errors import ArchiveError, ReplayError
from reprokit.archive import _format
from reprokit.archive._allowlist import AllowList
from reprokit.archive._collector import collector_paused
from reprokit.archive._container import Limits
from reprokit.archive._open import OpenedArchive, open_archive  # noqa: F401 (re-exported)
from reprokit.archive._structure import RECORD_PARTS, check_structure  # noqa: F401 (re-exported)
from reprokit.archive._trust import TrustPolicy
from reprokit.record import _bundle, _flax
from reprokit.record._encoding import decode_tree
from reprokit.replaying._checkpoint import CheckpointArrays


@dataclasses.dataclass(frozen=True)
class LoadedArchive:
    """An archive rebuilt into live objects: the record plus its manifest."""

    path: str
    manifest: dict
    record: dict
    config_problems: tuple[str, ...]
    self_check: dict | None = None
    # Where sharded arrays were placed (reprokit.replaying._sharding); None: nothing sharded.
    topology: dict | None = None
    # The StableHLO artifact's bytes, read (CRC-checked) while the archive was open.
    stablehlo: bytes | None = None

    @property
    def submodel(self) -> Any:
        return self.record["submodel"]


def load(
    path: str | os.PathLike | OpenedArchive,
    *,
    allow_modules: tuple[str, ...] | list[str] = (),
    limits: Limits | None = None,
    config_overrides: dict | None = None,
    mesh: Any = None,
    trust_code: bool = False,
) -> LoadedArchive:
    """Validates an archive and rebuilds its record (submodel, inputs, outputs, state).

    Restores the recorded jax configuration first (then `config_overrides`,
    e.g. {"jax_enable_x64": True} for a float64 reference), before any array
    exists. Types are rebuilt only from reprokit's allow-list plus `allow_modules`,
    plus, with `trust_code`, the modules the archive bundles (`--bundle-code`).
    `mesh` places sharded arrays: "auto" (default), "recorded", "1", or
    "AXIS=SIZE,..." (see `reprokit.replaying._sharding`).

    `path` may also be an archive the caller already opened (`open_archive`
    with the same `allow_modules`), so that a command reads its archive once;
    it is closed when `load` returns.
    """
    return load_archive(
        path,
        TrustPolicy.of(allow_modules, trust_code),
        limits=limits,
        config_overrides=config_overrides,
        mesh=mesh,
    )


def load_archive(
    source: str | os.PathLike | OpenedArchive,
    trust: TrustPolicy,
    *,
    limits: Limits | None = None,
    config_overrides: dict | None = None,
    mesh: Any = None,
) -> LoadedArchive:
    """`load` under the maintainer's `trust` (the form reprokit's own callers use).

    `source` is a path, opened here under `limits`, or an archive the caller
    opened already (with `trust.modules`), which is closed when this returns.
    """
    # Paused while the archive is opened and the record rebuilt: full
    # collections made loading many small arrays grow faster than their count.
    with collector_paused():
        if isinstance(source, OpenedArchive):
            opened = source
        else:
            opened = open_archive(source, limits, allow_modules=trust.modules)
        try:
            _check_memory(opened.structure["arrays"])
            _flax.require_flax(opened.structure, opened.manifest)
            with _bundle.admitted(opened, trust) as allowed:
                return _decode(opened, AllowList(allowed), config_overrides or {}, mesh)
        finally:
            opened.close()


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _check_memory(descriptors: list[dict]) -> None:
    # Fills have no bytes in the archive, so a tiny one can ask for any size up
    # to the total limit: refuse here rather than be killed for memory midway.
    needed = sum(desc["nbytes"] for desc in descriptors)
    available = available_memory()
    if available is not None and needed > available:
        raise ArchiveError(
            f"the archive's arrays need {_format.human_bytes(needed)} of memory and "
            f"{_format.human_bytes(available)} is available here; refused (replay it on a "
            "machine with more memory; reprokit inspect reads it without rebuilding)"
        )


def _decode(
    opened: OpenedArchive, allow: AllowList, config_overrides: dict, mesh: Any = None
) -> LoadedArchive:
    import jax

    from reprokit.portable._arrays import filled, rebuild
    from reprokit.portable._jax_config import apply_jax_config

    recorded = opened.manifest["environment"].get("jax_config", {})
    if isinstance(recorded, dict):
        # These only forbid running or tracing: a replay could do nothing.
        recorded = {k: v for k, v in recorded.items() if k not in _NEVER_APPLIED}
    problems = tuple(apply_jax_config(recorded))
    for name, value in config_overrides.items():
        jax.config.update(name, value)
    descriptors = opened.structure["arrays"]
    cache: dict[int, Any] = {}
    from reprokit.replaying._sharding import Placement, parse_mesh

    placement = Placement(descriptors, mesh)
    checkpoint = (
        CheckpointArrays(opened)
        if any("checkpoint" in desc for desc in descriptors)
        else None
    )

    cache.update(_small_arrays(opened, descriptors))

    def array(index: int) -> Any:
        if not 0 <= index < len(descriptors):
            raise ArchiveError(
                f"structure refers to array {index}, which the archive does not hold"
            )
        if index not in cache:
            desc = descriptors[index]
            member = _format.array_member(index)
            if desc.get("fill") is not None:
                try:
                    raw = filled(desc)
                except ValueError as error:
                    raise ArchiveError(f"array {index}: {error}") from None
            elif checkpoint is not None and "checkpoint" in desc:
                raw = checkpoint.read(desc)
            elif opened.reader.size(member) != desc["nbytes"]:
                raise ArchiveError(f"member {member!r} has the wrong size for its array")
            else:
                raw = opened.reader.read_aligned(member)
            sharding = placement.sharding(desc, index)
            try:
                cache[index] = rebuild(desc, raw, sharding)
            except ValueError as error:
                raise ArchiveError(f"array {index}: {error}") from None
            except Exception as error:  # jax refusing here (memory, config) is not a bad archive
                message = " ".join(str(error).split())[:200]
                raise ReplayError(
                    f"cannot rebuild array {index} here: {type(error).__name__}: {message}"
                ) from None
        return cache[index]

    record = {
        name: decode_tree(node, allow, array) for name, node in opened.structure["record"].items()
    }
    _check_record(record)
    sharded = placement.topology["recorded"] or parse_mesh(mesh).kind != "auto"
    return LoadedArchive(
        path=opened.path,
        manifest=opened.manifest,
        record=record,
        config_problems=problems,
        self_check=opened.self_check,
        topology=placement.topology if sharded else None,
        stablehlo=_stablehlo_bytes(opened),
    )


# Arrays up to this size are read together and put on the device in one
# call: with 10,000 small leaves, one read and one device_put each were most
# of a load.
_SMALL_ARRAY_BYTES = 1 << 16
_SMALL_BATCH_BYTES = 8 << 20


def _small_arrays(opened: OpenedArchive, descriptors: list[dict]) -> dict:
    """The archive's small single-device jax arrays, rebuilt in one batch (index -> array).

    Anything unusual (a fill, a key, a sharding, a bad payload) is left to
    the one-by-one path, which also reports errors array by array. Without a
    recorded sharding an array goes to the default device on either path.
    """
    import jax
    import numpy as np

    from reprokit.portable._arrays import _as_weak_type, check_descriptor, dtype_from_name

    chosen = [
        index
        for index, desc in enumerate(descriptors)
        if desc.get("kind") == "jax"
        and "fill" not in desc
        and "checkpoint" not in desc
        and "sharding" not in desc
        and isinstance(desc.get("nbytes"), int)
        and 0 < desc["nbytes"] <= _SMALL_ARRAY_BYTES
    ]
    if len(chosen) < 2:
        return {}
    rebuilt: dict[int, Any] = {}
    # A few MiB at a time: the bytes read are held only until they are on the device.
    batches: list[list[int]] = [[]]
    batch_bytes = 0
    for index in chosen:
        if batch_bytes >= _SMALL_BATCH_BYTES:
            batches.append([])
            batch_bytes = 0
        batches[-1].append(index)
        batch_bytes += descriptors[index]["nbytes"]
    try:
        for batch in batches:
            payloads = opened.reader.read_small_members([_format.array_member(i) for i in batch])
            views = []
            for index, payload in zip(batch, payloads, strict=True):
                desc = descriptors[index]
                if check_descriptor(desc) != len(payload):
                    return {}
                data = np.frombuffer(payload, dtype=dtype_from_name(desc["dtype"]))
                views.append(data.reshape(desc["shape"]))
            arrays = jax.device_put(views)
            del payloads, views
            for index, array in zip(batch, arrays, strict=True):
                rebuilt[index] = (
                    _as_weak_type(array) if descriptors[index].get("weak_type") else array
                )
    except Exception:  # the one-by-one path says what is wrong, and where
        return {}
    return rebuilt


def _stablehlo_bytes(opened: OpenedArchive) -> bytes | None:
    meta = opened.manifest.get("stablehlo")
    if not isinstance(meta, dict) or "error" in meta or _format.STABLEHLO not in opened.reader:
        return None
    return opened.reader.read_bytes(_format.STABLEHLO)


_NEVER_APPLIED = frozenset({"jax_no_execution", "jax_no_tracing"})


def _check_record(record: dict) -> None:
    from penzai import pz

    if not isinstance(record["submodel"], pz.nn.Layer):
        raise ArchiveError("the archive's submodel is not a penzai layer")
    if not isinstance(record["side_inputs"], dict) or not all(
        isinstance(k, str) for k in record["side_inputs"]
    ):
        raise ArchiveError("the archive's side inputs are not a dict of names")
    for part in ("initial_var_values", "final_var_values"):
        values = record.get(part, ())
        if not isinstance(values, tuple) or not all(
            isinstance(v, pz.StateVariableValue) for v in values
        ):
            raise ArchiveError("the archive's variable values are not penzai StateVariableValues")
    # The recorded output is compared leaf by leaf with the replayed one.
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves((record.get("output"), record.get("final_var_values")))
    if not all(
        isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))
        for leaf in leaves
    ):
        raise ArchiveError("the archive's recorded output holds something that is not an array")
    if "gradients" in record or "output_cotangent" in record:
        _check_backward_parts(record)


def _check_backward_parts(record: dict) -> None:
    """A gradient record: a list of cotangent arrays and a dict of named gradient arrays."""
    import jax
    import numpy as np

    cotangent, gradients = record.get("output_cotangent"), record.get("gradients")
    arrays = (jax.Array, np.ndarray, np.generic)
    if not isinstance(cotangent, list | tuple) or not all(isinstance(c, arrays) for c in cotangent):
        raise ArchiveError("the archive's output cotangent is not a list of arrays")
    if not isinstance(gradients, dict) or not all(
        isinstance(k, str) and isinstance(v, arrays) for k, v in gradients.items()
    ):
        raise ArchiveError("the archive's recorded gradients are not named arrays")
    # The names are printed in the verdict: printable and short, as reprokit writes them.
    if not all(name.isprintable() and len(name) <= 300 for name in gradients):
        raise ArchiveError("the archive's recorded gradients have unprintable or overlong names")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a replay measured and decided; `format()` for people, `as_dict()` for JSON."""

    reproduced: bool
    details: dict
    manifest: dict
    notes: tuple[str, ...]
    environment_differences: tuple
    reporter_self_check: dict | None = None
    # Where sharded arrays were placed (see reprokit.replaying._sharding); None: nothing sharded.
    topology: dict | None = None

    def as_dict(self) -> dict:
        return {
            "reproduced": self.reproduced,
            **self.details,
            "recorded_mode": self.manifest["mode"],
            "layer": self.manifest["layer"],
            "topology": self.topology,
            "reporter_self_check": self.reporter_self_check,
            "found_by": self.manifest.get("found_by"),
            "notes": list(self.notes),
            "environment_differences": [
                dataclasses.asdict(d) for d in self.environment_differences
            ],
        }

    def format(self) -> str:
        from reprokit.environment._diff import format_environment_table
        from reprokit.portable._verdict import format_verdict

        layer = self.manifest["layer"]
        lines = [
            format_verdict(self.details),
            f"  layer: {layer['type']} at {layer['keypath']}{_format.flax_suffix(layer)} "
            f"(replayed {self.manifest['mode']})",
        ]
        from reprokit.replaying._sharding import describe_topology

        topology = describe_topology(self.topology)
        if topology:
            lines.append(f"  topology: {topology}")
        from reprokit.archive._provenance import found_by_lines, self_check_lines

        # How the archive was made: how the layer was found, what the self-check measured.
        lines += ["  " + line for line in found_by_lines(self.manifest)]
        lines += ["  " + line for line in self_check_lines(self.reporter_self_check, self.manifest)]
        lines += [f"  note: {note}" for note in self.notes]
        important = [d for d in self.environment_differences if d.version_sensitive]
        if important:
            lines.append("  environment differences that may matter:")
            lines += ["    " + line for line in format_environment_table(important).splitlines()]
        elif self.environment_differences:
            lines.append(
                f"  environment: {len(self.environment_differences)} minor differences (reprokit inspect)"
            )
        else:
            lines.append("  environment: same versions, platform and numerics config as recorded")
        return "\n".join(lines)


def stablehlo_outcome(loaded: LoadedArchive) -> dict:
    """Runs the archive's StableHLO artifact on the record's arrays and returns its outcome."""
    from reprokit.portable._calling import exception_info, outcome_from_call
    from reprokit.record import _stablehlo

    meta = loaded.manifest.get("stablehlo")
    if not isinstance(meta, dict) or "error" in meta or not meta:
        reason = meta.get("error") if isinstance(meta, dict) else None
        raise ReplayError(
            f"this archive has no StableHLO artifact{': ' + str(reason) if reason else ''}"
        )
    if loaded.stablehlo is None:
        raise ReplayError("this archive has no StableHLO artifact")
    exported = _stablehlo.rebuild_exported(loaded.stablehlo, meta)
    backward = "gradients" in loaded.record
    try:
        results = _stablehlo.call_exported(exported, loaded.record)
    except ReplayError:
        raise
    except Exception as error:
        outcome = outcome_from_call(None, None, exception_info(error))
        return {**outcome, "gradients": []} if backward else outcome
    if backward:
        from reprokit.portable._gradients import gradient_outcome

        output, final, gradients = results
        return gradient_outcome(outcome_from_call(output, final, None), gradients)
    output, final = results
    return outcome_from_call(output, final, None)


def replay(
    path: str | os.PathLike,
    *,
    allow_modules: tuple[str, ...] | list[str] = (),
    limits: Limits | None = None,
    mesh: Any = None,
    trust_code: bool = False,
) -> Verdict:
    """Replays an archive in this process and returns the verdict (`mesh`, `trust_code`: see `load`)."""
    loaded = load_archive(
        path, TrustPolicy.of(allow_modules, trust_code), limits=limits, mesh=mesh
    )
    return replay_loaded(loaded)


def recorded_outcome(loaded: LoadedArchive) -> dict:
    """The outcome the reporter recorded, in the form `reprokit.portable._verdict` compares."""
    from reprokit.portable._calling import outcome_from_call

    if loaded.manifest["signature"]["kind"] == "exception":
        return {"exception": loaded.manifest["signature"], "output": [], "state": []}
    record = loaded.record
    outcome = outcome_from_call(record.get("output"), record.get("final_var_values"), None)
    if "gradients" in record:
        from reprokit.portable._gradients import gradient_outcome

        outcome = gradient_outcome(outcome, record["gradients"])
    return outcome


def replayed_outcome(loaded: LoadedArchive, mode: str | None = None, record: dict | None = None) -> dict:
    """Calls the rebuilt layer (in the recorded mode unless `mode` is given) and returns its outcome."""
    from reprokit.portable._calling import call_layer, exception_info, outcome_from_call

    record = record or loaded.record
    if "output_cotangent" in record:
        return _replayed_backward(record, mode or loaded.manifest["mode"])
    try:
        output, final = call_layer(
            record["submodel"],
            record["initial_var_values"],
            record["argument"],
            record["side_inputs"],
            mode or loaded.manifest["mode"],
        )
    except RecursionError as error:
        raise ReplayError(f"replay failed: {exception_info(error)['message']}") from None
    except Exception as error:
        return outcome_from_call(None, None, exception_info(error))
    return outcome_from_call(output, final, None)


def _replayed_backward(record: dict, mode: str) -> dict:
    """A gradient record's outcome: `jax.vjp` of the layer, pulling back the recorded cotangent."""
    from reprokit.portable._calling import exception_info, outcome_from_call
    from reprokit.portable._gradients import call_layer_vjp, gradient_outcome

    try:
        output, final, gradients = call_layer_vjp(
            record["submodel"],
            record["initial_var_values"],
            record["argument"],
            record["side_inputs"],
            mode,
            record["output_cotangent"],
        )
    except RecursionError as error:
        raise ReplayError(f"replay failed: {exception_info(error)['message']}") from None
    except Exception as error:
        return gradient_outcome(outcome_from_call(None, None, exception_info(error)), None)
    return gradient_outcome(outcome_from_call(output, final, None), gradients)


def replay_loaded(loaded: LoadedArchive, *, stablehlo: bool = False) -> Verdict:
    """Calls the rebuilt layer in the recorded mode (or its StableHLO artifact) and judges the outcome."""
    from reprokit.environment._diff import diff_environments
    from reprokit.environment._snapshot import capture_environment
    from reprokit.portable._verdict import judge

    manifest = loaded.manifest
    if stablehlo:
        replayed = stablehlo_outcome(loaded)
    else:
        replayed = replayed_outcome(loaded)
    details = judge(manifest["signature"], recorded_outcome(loaded), replayed)
    notes = list(loaded.config_problems)
    if stablehlo:
        notes.append("replayed the StableHLO artifact (the layer under jit, without penzai)")
    env = manifest["environment"]
    here = capture_environment()
    if env.get("xla_flags") and env.get("xla_flags") != here.get("xla_flags"):
        notes.append("recorded XLA_FLAGS are not in force here (reprokit run sets them before jax starts)")
    return Verdict(
        reproduced=bool(details["reproduced"]),
        details=details,
        manifest=manifest,
        notes=tuple(notes),
        environment_differences=tuple(diff_environments(env, here)),
        reporter_self_check=loaded.self_check,
        topology=loaded.topology,
    )
