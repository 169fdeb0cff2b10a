"""The `checkpoint/` members of a multi-process archive, checked without jax or orbax.

A capture from several processes stores its arrays as an orbax checkpoint
inside the archive (`reprokit.capture._multihost` writes it; tensorstore
reads it in place on replay, `reprokit.replaying._checkpoint`). The manifest
section that describes it, the member names and the agreement between the
array table and the checkpoint are plain data, checked here so that
`verify` and `inspect` need neither jax nor tensorstore.
"""

from __future__ import annotations

import re
from typing import Any

from reprokit._errors import ArchiveError

CHECKPOINT_PREFIX = "checkpoint/"
SECTION = "multiprocess"
CHECKPOINT_ROOT = CHECKPOINT_PREFIX + "manifest.ocdbt"
_MEMBER = re.compile(r"checkpoint/[A-Za-z0-9_.=-]{1,128}(?:/[A-Za-z0-9_.=-]{1,128}){0,8}")
_DRIVERS = frozenset({"zarr", "zarr3"})
_STORAGES = frozenset({"checkpoint", "gather", "local"})


def section(manifest: dict) -> dict | None:
    """The manifest's multi-process section, validated; None for single-process archives."""
    value = manifest.get(SECTION)
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("storage") not in _STORAGES:
        raise ArchiveError(f"manifest.json has a malformed {SECTION!r} section")
    for key in ("process_count", "device_count"):
        if type(value.get(key)) is not int or value[key] < 1:
            raise ArchiveError(f"manifest.json has a malformed {SECTION!r} section")
    checkpoint = value.get("checkpoint")
    if (value["storage"] == "checkpoint") != (checkpoint is not None):
        raise ArchiveError(f"manifest.json has a malformed {SECTION!r} section")
    if checkpoint is not None and (
        not isinstance(checkpoint, dict) or checkpoint.get("driver") not in _DRIVERS
    ):
        raise ArchiveError("manifest.json names an unknown checkpoint format")
    return value


def member_names(manifest: dict, names: list[str]) -> set[str]:
    """Members of the archive's checkpoint folder (each name checked); empty when it has none."""
    info = section(manifest)
    if info is None or info.get("checkpoint") is None:
        return set()
    found = {name for name in names if name.startswith(CHECKPOINT_PREFIX)}
    for name in found:
        if not _MEMBER.fullmatch(name):
            raise ArchiveError(
                f"archive holds an unexpected checkpoint member {name[:80]!r}; refused"
            )
    return found


def check_members(reader: Any, manifest: dict, structure: dict) -> None:
    """Arrays name a checkpoint exactly when the archive holds one, and it has its root."""
    info = section(manifest)
    has_checkpoint = info is not None and info.get("checkpoint") is not None
    uses = any(isinstance(d, dict) and "checkpoint" in d for d in structure["arrays"])
    if uses != has_checkpoint:
        raise ArchiveError("the array table and the manifest disagree about the checkpoint")
    if has_checkpoint and CHECKPOINT_ROOT not in reader:
        raise ArchiveError(f"archive is missing {CHECKPOINT_ROOT!r}")
