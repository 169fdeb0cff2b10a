"""`open_archive`: the one way every command opens an archive, before any jax exists.

`run`, `inspect`, `verify`, `issue` and the workers all start the same way:
open the zip container under the caller's limits, parse the manifest, check
the member set, read and statically check the structure against the
allow-list's rules, and check the optional members. Doing it in one place
(here, in the archive layer, with no jax) means every command refuses
exactly what `verify` refuses, and a command can open an archive once and
hand the opened archive on instead of reopening it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from reprokit._errors import ArchiveError
from reprokit.archive import _checkpoint, _code, _format
from reprokit.archive._allowlist import AllowList
from reprokit.archive._container import ArchiveReader, Limits
from reprokit.archive._grammar import MAX_STRUCTURE_BYTES, max_containers, unpack_bytes
from reprokit.archive._structure import check_structure


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
        own = _code.member_names(manifest) | _checkpoint.member_names(manifest, reader.names)
        _format.check_member_names(
            [name for name in reader.names if name not in own], manifest["arrays"]["count"]
        )
        structure = _read_structure(reader, limits, manifest)
        # Names from bundled modules pass this static check (it imports nothing);
        # `load` refuses to import them without --trust-code.
        bundled = _code.bundled_modules(manifest)
        allow = None if allow_modules is None else AllowList(tuple(allow_modules) + bundled)
        check_structure(structure, manifest, allow, max_array_bytes=limits.max_total_bytes)
        descriptors = structure["arrays"]
        members = [_format.array_member(index) for index in range(len(descriptors))]
        sizes = reader.sizes(members)
        for index, (desc, size) in enumerate(zip(descriptors, sizes, strict=True)):
            if desc.get("fill") is not None or "checkpoint" in desc:
                if size is not None:
                    raise ArchiveError(
                        f"array {index} has no payload member, yet {members[index]!r} exists"
                    )
                continue
            if size is None:
                raise ArchiveError(f"archive is missing array payload {members[index]!r}")
            if size != desc["nbytes"]:
                raise ArchiveError(f"member {members[index]!r} has the wrong size for its array")
        to_verify = []
        for name in reader.names:
            # A flipped byte in any member refuses the whole archive, and a
            # member must hold what its name says (not, say, a pickle).
            if name.startswith("arrays/") or name in own:
                if verify_members and not name.startswith(_code.CODE_PREFIX):
                    to_verify.append(name)
            elif name not in (_format.MANIFEST, _format.STRUCTURE):
                _format.check_optional_member(name, reader.read_bytes(name))
        # In batches: one read per member cost most of inspecting 100,000 arrays.
        reader.verify_members(to_verify)
        _code.check_members(reader, manifest)
        _checkpoint.check_members(reader, manifest, structure)
        self_check = _read_self_check(reader)
    except BaseException:
        reader.close()
        raise
    return OpenedArchive(
        path=path, manifest=manifest, structure=structure, reader=reader, self_check=self_check
    )


def _read_structure(reader: ArchiveReader, limits: Limits, manifest: dict) -> Any:
    """The structure, parsed with its memory bounded before and while parsing (class 6).

    The member is capped at `MAX_STRUCTURE_BYTES` (or at `--max-member-size`
    when that is raised above its default, for an archive you trust), the
    lists and maps parsing may build in proportion, and the array table at
    `--max-members` entries: a fill has no member, but costs memory to list.
    """
    count = manifest["arrays"]["count"]
    if count > limits.max_members:
        raise ArchiveError(
            f"archive declares {count} arrays; the limit is {limits.max_members} "
            f"(--max-members; raise it only for an archive you trust)"
        )
    raised = limits.max_small_member_bytes > Limits().max_small_member_bytes
    cap = limits.max_small_member_bytes if raised else MAX_STRUCTURE_BYTES
    size = reader.size(_format.STRUCTURE)
    if size > cap:
        raise ArchiveError(
            f"{_format.STRUCTURE} is {size} bytes; the limit is {cap} "
            f"(--max-member-size; raise it only for an archive you trust)"
        )
    return unpack_bytes(reader.read_bytes(_format.STRUCTURE), containers=max_containers(cap))


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
    from reprokit.archive._provenance import read_self_check

    return read_self_check(data)


