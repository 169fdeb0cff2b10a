"""Loading an archive for replay, replaying it, and reporting what was measured.

The pipeline's back half, archive -> decode -> replay: open and validate the
container, check the manifest, restore the recorded jax configuration
(x64 before any array exists), decode the structure under the allow-list
with arrays read straight into aligned buffers, call the layer in the
recorded mode, and judge the outcome against the recorded signature.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from reprokit._errors import ArchiveError, ReplayError
from reprokit.archive import _format
from reprokit.archive._allowlist import AllowList
from reprokit.archive._container import ArchiveReader, Limits
from reprokit.archive._verify import RECORD_PARTS, check_structure  # noqa: F401 (re-exported)
from reprokit.capture import _multihost
from reprokit.record import _bundle
from reprokit.record._encoding import decode_tree, unpack_bytes


@dataclasses.dataclass(frozen=True)
class OpenedArchive:
    """A validated archive whose manifest and structure are read but not yet decoded."""

    path: str
    manifest: dict
    structure: dict
    reader: ArchiveReader
    self_check: dict | None = None

    def close(self) -> None:
        self.reader.close()


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

    @property
    def submodel(self) -> Any:
        return self.record["submodel"]


def open_archive(
    path: str | os.PathLike,
    limits: Limits | None = None,
    *,
    allow_modules: tuple[str, ...] | list[str] | None = None,
    verify_members: bool = False,
) -> OpenedArchive:
    """Opens and validates an archive's container, manifest and structure without jax.

    Every member but the arrays is read and CRC-checked here (arrays are
    checked as they are loaded, or here too with `verify_members`), and every
    node of the structure is checked statically (`reprokit.archive._verify`): names
    against the allow-list plus `allow_modules`, or, with `allow_modules`
    None (for `inspect`, which rebuilds nothing), only against what no
    `--allow-module` would admit.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArchiveError(f"{path!r} is not a file")
    limits = limits or Limits()
    reader = ArchiveReader(path, limits)
    try:
        manifest = _format.parse_manifest(reader.read_bytes(_format.MANIFEST))
        # Bundled code and a multi-process checkpoint are checked by their own modules.
        own = _bundle.member_names(manifest) | _multihost.member_names(manifest, reader.names)
        _format.check_member_names(
            [name for name in reader.names if name not in own], manifest["arrays"]["count"]
        )
        structure = unpack_bytes(reader.read_bytes(_format.STRUCTURE))
        # Names from bundled modules pass this static check (it imports nothing);
        # `load` refuses to import them without --trust-code.
        bundled = _bundle.bundled_modules(manifest)
        allow = None if allow_modules is None else AllowList(tuple(allow_modules) + bundled)
        check_structure(structure, manifest, allow, max_array_bytes=limits.max_total_bytes)
        for index, desc in enumerate(structure["arrays"]):
            member = _format.array_member(index)
            if desc.get("fill") is not None or "checkpoint" in desc:
                if member in reader:
                    raise ArchiveError(
                        f"array {index} has no payload member, yet {member!r} exists"
                    )
                continue
            if member not in reader:
                raise ArchiveError(f"archive is missing array payload {member!r}")
            if reader.size(member) != desc["nbytes"]:
                raise ArchiveError(f"member {member!r} has the wrong size for its array")
        for name in reader.names:
            # A flipped byte in any member refuses the whole archive, and a
            # member must hold what its name says (not, say, a pickle).
            if name.startswith("arrays/") or name in own:
                if verify_members and not name.startswith(_bundle.CODE_PREFIX):
                    reader.verify_member(name)
            elif name not in (_format.MANIFEST, _format.STRUCTURE):
                _format.check_optional_member(name, reader.read_bytes(name))
        _bundle.check_members(reader, manifest)
        _multihost.check_members(reader, manifest, structure)
        self_check = _read_self_check(reader)
    except BaseException:
        reader.close()
        raise
    return OpenedArchive(
        path=path, manifest=manifest, structure=structure, reader=reader, self_check=self_check
    )


def _read_self_check(reader: ArchiveReader) -> dict | None:
    """The reporter's self-check result, reduced to the few plain fields `run` shows."""
    if _format.SELFCHECK not in reader.names:
        return None
    try:
        data = json.loads(reader.read_bytes(_format.SELFCHECK))
    except (ValueError, RecursionError):
        raise ArchiveError(f"{_format.SELFCHECK} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{_format.SELFCHECK} is not a JSON object")
    return {k: data[k] for k in ("ran", "reproduced", "output_bitwise_equal") if isinstance(data.get(k), bool)}


def load(
    path: str | os.PathLike,
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
    """
    opened = open_archive(path, limits, allow_modules=tuple(allow_modules))
    try:
        _check_memory(opened.structure["arrays"])
        with _bundle.admitted(opened, tuple(allow_modules), trust_code) as allowed:
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
        _multihost.CheckpointArrays(opened)
        if any("checkpoint" in desc for desc in descriptors)
        else None
    )

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
    )


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
            "notes": list(self.notes),
            "environment_differences": [
                dataclasses.asdict(d) for d in self.environment_differences
            ],
        }

    def format(self) -> str:
        from reprokit.capture._selfcheck import reporter_line
        from reprokit.environment._diff import format_environment_table
        from reprokit.portable._verdict import format_verdict

        layer = self.manifest["layer"]
        lines = [
            format_verdict(self.details),
            f"  layer: {layer['type']} at {layer['keypath']} (replayed {self.manifest['mode']})",
        ]
        from reprokit.replaying._sharding import describe_topology

        topology = describe_topology(self.topology)
        if topology:
            lines.append(f"  topology: {topology}")
        reporter = reporter_line(self.reporter_self_check)
        if reporter:
            lines.append(f"  {reporter}")
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


def replay(
    path: str | os.PathLike,
    *,
    allow_modules: tuple[str, ...] | list[str] = (),
    limits: Limits | None = None,
    mesh: Any = None,
    trust_code: bool = False,
) -> Verdict:
    """Replays an archive in this process and returns the verdict (`mesh`, `trust_code`: see `load`)."""
    loaded = load(
        path, allow_modules=allow_modules, limits=limits, mesh=mesh, trust_code=trust_code
    )
    return replay_loaded(loaded)


def recorded_outcome(loaded: LoadedArchive) -> dict:
    """The outcome the reporter recorded, in the form `reprokit.portable._verdict` compares."""
    from reprokit.portable._calling import outcome_from_call

    if loaded.manifest["signature"]["kind"] == "exception":
        return {"exception": loaded.manifest["signature"], "output": [], "state": []}
    record = loaded.record
    return outcome_from_call(record.get("output"), record.get("final_var_values"), None)


def replayed_outcome(loaded: LoadedArchive, mode: str | None = None, record: dict | None = None) -> dict:
    """Calls the rebuilt layer (in the recorded mode unless `mode` is given) and returns its outcome."""
    from reprokit.portable._calling import call_layer, exception_info, outcome_from_call

    record = record or loaded.record
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


def replay_loaded(loaded: LoadedArchive, *, stablehlo: bool = False) -> Verdict:
    """Calls the rebuilt layer in the recorded mode (or its StableHLO artifact) and judges the outcome."""
    from reprokit.environment._diff import diff_environments
    from reprokit.environment._snapshot import capture_environment
    from reprokit.portable._verdict import judge

    manifest = loaded.manifest
    if stablehlo:
        from reprokit.replaying._variants import stablehlo_outcome

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
