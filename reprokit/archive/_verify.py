"""`reprokit verify`: every check an archive can fail, without importing jax or running anything.

A maintainer handed an archive by a stranger wants one cheap answer before
anything else: is this a well-formed reprokit archive that names only what
the loader would rebuild? Verifying checks, in order: the zip container
(`ArchiveReader`: names, links, sizes, zip bombs), the manifest's schema,
the set of members, the CRC-32 of every member (arrays streamed in chunks),
the structure's msgpack, its array table, and every node of the encoded
record, whose class and function names are checked against the loader's
allow-list *by the rules alone* (syntax, module prefix, deny list): no
module is imported, so a verify cannot be made to run import-time code.

The same static walk (`reprokit.archive._structure`) runs whenever the loader opens an
archive, so `inspect` and `run` refuse what `verify` refuses. What it cannot
decide without importing (that a name really is a class of that module, that
a field list matches the class) is left to the loader, which checks it again
while rebuilding. So verify may pass an archive that `run` later refuses,
but never the other way round.

This module imports neither jax nor penzai (a test holds it to that).
"""
from __future__ import annotations

import dataclasses
import os

from reprokit.archive import _format
from reprokit.archive._container import Limits
from reprokit.archive._open import OpenedArchive, open_archive
from reprokit.archive._structure import RECORD_PARTS, check_structure  # noqa: F401 (re-exported)
from reprokit.archive._trust import TrustPolicy

__all__ = ["VerifyReport", "check_structure", "verify_archive"]


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What `verify_archive` checked: enough to cite the archive in an issue."""

    path: str
    sha256: str
    size: int
    format_version: int
    members: int
    arrays: int
    array_bytes: int
    layer: str
    issue: str
    modules: tuple[str, ...]

    def format(self) -> str:
        """The lines `reprokit verify` prints."""
        lines = [
            f"{os.path.basename(self.path)}: valid reprokit archive (format {self.format_version}, "
            f"{self.members} members, {self.arrays} arrays, "
            f"{_format.human_bytes(self.array_bytes)} of array data; every CRC checked)",
            f"sha256: {self.sha256}",
            f"layer: {self.layer}",
            f"recorded issue: {self.issue}",
        ]
        if self.modules:
            lines.append(
                "needs your modules: " + ", ".join(self.modules) + " (--allow-module, if trusted)"
            )
        lines.append(
            "replay.py inside is code written by the reporter: read it before running it; "
            "`reprokit run` does not execute it"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {**dataclasses.asdict(self), "modules": list(self.modules), "valid": True}


def verify_archive(
    path: str | os.PathLike[str] | OpenedArchive,
    *,
    trust: TrustPolicy | None = None,
    limits: Limits | None = None,
) -> VerifyReport:
    """Checks everything about an archive that can be checked without running it.

    Container, manifest, member set, every member's size and CRC-32 (arrays
    streamed), the structure and its array table, and every name against the
    loader's allow-list plus `trust.modules`, by the rules alone. Imports
    neither jax nor penzai and no module the archive names.

    `path` may also be an archive the caller opened with `open_archive(...,
    verify_members=True)` (so that a command reads its archive once); the
    caller then closes it, and `trust` and `limits` were the caller's to apply.

    Raises:
        ArchiveError: the archive is invalid or names something refused.
    """
    if isinstance(path, OpenedArchive):
        return _report(path)
    modules = trust.modules if trust is not None else ()
    opened = open_archive(path, limits, allow_modules=modules, verify_members=True)
    try:
        return _report(opened)
    finally:
        opened.close()


def _report(opened: OpenedArchive) -> VerifyReport:
    sha256 = opened.reader.sha256()
    members = len(opened.reader.names)
    manifest = opened.manifest
    layer = manifest["layer"]
    return VerifyReport(
        path=opened.path,
        sha256=sha256,
        size=os.path.getsize(opened.path),
        format_version=manifest["format_version"],
        members=members,
        arrays=len(opened.structure["arrays"]),
        array_bytes=sum(desc["nbytes"] for desc in opened.structure["arrays"]),
        layer=f"{layer['type']} at {layer['keypath']}",
        issue=_format.describe_signature(manifest["signature"]),
        modules=tuple(manifest["modules"]),
    )
