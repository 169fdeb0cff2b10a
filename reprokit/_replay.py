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

from reprokit import _format
from reprokit._allowlist import AllowList
from reprokit._archive import ArchiveReader, Limits
from reprokit._encoding import decode_tree, unpack_bytes
from reprokit._errors import ArchiveError, ReplayError

RECORD_PARTS = (
    "submodel",
    "argument",
    "side_inputs",
    "initial_var_values",
    "output",
    "final_var_values",
)


@dataclasses.dataclass(frozen=True)
class OpenedArchive:
    """A validated archive whose manifest and structure are read but not yet decoded."""

    path: str
    manifest: dict
    structure: dict
    reader: ArchiveReader

    def close(self) -> None:
        self.reader.close()


@dataclasses.dataclass(frozen=True)
class LoadedArchive:
    """An archive rebuilt into live objects: the record plus its manifest."""

    path: str
    manifest: dict
    record: dict
    config_problems: tuple[str, ...]

    @property
    def submodel(self) -> Any:
        return self.record["submodel"]


def open_archive(path: str | os.PathLike, limits: Limits | None = None) -> OpenedArchive:
    """Opens and validates an archive's container, manifest and structure without jax."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArchiveError(f"{path!r} is not a file")
    reader = ArchiveReader(path, limits or Limits())
    try:
        try:
            manifest = json.loads(reader.read_bytes(_format.MANIFEST))
        except (ValueError, RecursionError):
            raise ArchiveError("manifest.json is not valid JSON") from None
        _format.check_manifest(manifest)
        _format.check_member_names(reader.names, manifest["arrays"]["count"])
        structure = unpack_bytes(reader.read_bytes(_format.STRUCTURE))
        _check_structure(structure, manifest)
    except BaseException:
        reader.close()
        raise
    return OpenedArchive(path=path, manifest=manifest, structure=structure, reader=reader)


def _check_structure(structure: Any, manifest: dict) -> None:
    from reprokit._arrays import check_descriptor

    if not isinstance(structure, dict) or set(structure) != {"record", "arrays"}:
        raise ArchiveError("structure.msgpack does not hold a record and an array table")
    record, arrays = structure["record"], structure["arrays"]
    if not isinstance(record, dict) or not set(record) <= set(RECORD_PARTS):
        raise ArchiveError("structure.msgpack holds an unexpected record")
    has_output = "output" in record
    if has_output == (manifest["signature"]["kind"] == "exception"):
        raise ArchiveError("the record's output does not match its signature")
    if not isinstance(arrays, list) or len(arrays) != manifest["arrays"]["count"]:
        raise ArchiveError("the array table does not match the manifest")
    for index, desc in enumerate(arrays):
        try:
            check_descriptor(desc)
        except ValueError as error:
            raise ArchiveError(f"array {index}: {error}") from None


def load(
    path: str | os.PathLike,
    *,
    allow_modules: tuple[str, ...] | list[str] = (),
    limits: Limits | None = None,
) -> LoadedArchive:
    """Validates an archive and rebuilds its record (submodel, inputs, outputs, state).

    Restores the recorded jax configuration first. Types are rebuilt only from
    reprokit's allow-list plus `allow_modules`.
    """
    opened = open_archive(path, limits)
    try:
        return _decode(opened, AllowList(tuple(allow_modules)))
    finally:
        opened.close()


def _decode(opened: OpenedArchive, allow: AllowList) -> LoadedArchive:
    from reprokit._arrays import rebuild
    from reprokit._environment import apply_jax_config

    problems = tuple(apply_jax_config(opened.manifest["environment"].get("jax_config", {})))
    descriptors = opened.structure["arrays"]
    cache: dict[int, Any] = {}

    def array(index: int) -> Any:
        if not 0 <= index < len(descriptors):
            raise ArchiveError(
                f"structure refers to array {index}, which the archive does not hold"
            )
        if index not in cache:
            member = _format.array_member(index)
            if opened.reader.size(member) != descriptors[index]["nbytes"]:
                raise ArchiveError(f"member {member!r} has the wrong size for its array")
            try:
                cache[index] = rebuild(descriptors[index], opened.reader.read_aligned(member))
            except ValueError as error:
                raise ArchiveError(f"array {index}: {error}") from None
        return cache[index]

    record = {
        name: decode_tree(node, allow, array) for name, node in opened.structure["record"].items()
    }
    _check_record(record)
    return LoadedArchive(
        path=opened.path, manifest=opened.manifest, record=record, config_problems=problems
    )


def _check_record(record: dict) -> None:
    from penzai import pz

    if not isinstance(record["submodel"], pz.nn.Layer):
        raise ArchiveError("the archive's submodel is not a penzai layer")
    if not isinstance(record["side_inputs"], dict) or not all(
        isinstance(k, str) for k in record["side_inputs"]
    ):
        raise ArchiveError("the archive's side inputs are not a dict of names")
    values = record["initial_var_values"]
    if not isinstance(values, tuple) or not all(
        isinstance(v, pz.StateVariableValue) for v in values
    ):
        raise ArchiveError("the archive's variable values are not penzai StateVariableValues")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a replay measured and decided; `format()` for people, `as_dict()` for JSON."""

    reproduced: bool
    details: dict
    manifest: dict
    notes: tuple[str, ...]
    environment_differences: tuple

    def as_dict(self) -> dict:
        return {
            "reproduced": self.reproduced,
            **self.details,
            "recorded_mode": self.manifest["mode"],
            "layer": self.manifest["layer"],
            "notes": list(self.notes),
            "environment_differences": [
                dataclasses.asdict(d) for d in self.environment_differences
            ],
        }

    def format(self) -> str:
        from reprokit._environment import format_environment_table
        from reprokit._verdict import format_verdict

        layer = self.manifest["layer"]
        lines = [
            format_verdict(self.details),
            f"  layer: {layer['type']} at {layer['keypath']} (replayed {self.manifest['mode']})",
        ]
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
) -> Verdict:
    """Replays an archive in this process and returns the verdict."""
    loaded = load(path, allow_modules=allow_modules, limits=limits)
    return replay_loaded(loaded)


def replay_loaded(loaded: LoadedArchive) -> Verdict:
    """Calls the rebuilt layer in the recorded mode and judges the outcome."""
    from reprokit._calling import call_layer, exception_info, outcome_from_call
    from reprokit._environment import capture_environment, diff_environments
    from reprokit._verdict import judge

    record, manifest = loaded.record, loaded.manifest
    recorded = outcome_from_call(record.get("output"), record.get("final_var_values"), None)
    try:
        output, final = call_layer(
            record["submodel"],
            record["initial_var_values"],
            record["argument"],
            record["side_inputs"],
            manifest["mode"],
        )
        replayed = outcome_from_call(output, final, None)
    except RecursionError as error:
        raise ReplayError(f"replay failed: {exception_info(error)['message']}") from None
    except Exception as error:
        replayed = outcome_from_call(None, None, exception_info(error))
    if manifest["signature"]["kind"] == "exception":
        recorded = {"exception": manifest["signature"], "output": [], "state": []}
    details = judge(manifest["signature"], recorded, replayed)
    notes = list(loaded.config_problems)
    env = manifest["environment"]
    if env.get("xla_flags") and env.get("xla_flags") != capture_environment().get("xla_flags"):
        notes.append(
            "recorded XLA_FLAGS are not in force here (reprokit run sets them before jax starts)"
        )
    differences = tuple(diff_environments(env, capture_environment()))
    return Verdict(
        reproduced=bool(details["reproduced"]),
        details=details,
        manifest=manifest,
        notes=tuple(notes),
        environment_differences=differences,
    )
