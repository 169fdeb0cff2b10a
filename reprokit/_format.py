"""The archive format: member names, versions, and the manifest's schema.

Writer and reader agree on the layout through this module alone. The
manifest is checked here field by field before anything else reads it, so
the rest of the loader may trust its shape (never its content). This module
imports neither jax nor penzai: `reprokit inspect` and `verify` use it.
"""

from __future__ import annotations

import re
from typing import Any

from reprokit._errors import ArchiveError

FORMAT_NAME = "reprokit"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
STRUCTURE = "structure.msgpack"
REPLAY_SCRIPT = "replay.py"
README = "README.md"
REQUIREMENTS = "requirements.txt"
_ARRAY_MEMBER = re.compile(r"arrays/(0|[1-9][0-9]{0,8})\.bin")
_TEXT_MEMBERS = frozenset({REPLAY_SCRIPT, README, REQUIREMENTS})


def array_member(index: int) -> str:
    """Member name of the `index`-th array payload."""
    return f"arrays/{index}.bin"


def reprokit_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("reprokit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def check_member_names(names: list[str], array_count: int) -> None:
    """Refuses any member the format does not define (a stray pickle, a script, ...)."""
    for name in names:
        match = _ARRAY_MEMBER.fullmatch(name)
        if match and int(match.group(1)) < array_count:
            continue
        if name in (MANIFEST, STRUCTURE) or name in _TEXT_MEMBERS:
            continue
        raise ArchiveError(f"archive holds an unexpected member {name[:80]!r}; refused")
    for required in (MANIFEST, STRUCTURE):
        if required not in names:
            raise ArchiveError(f"archive has no {required}; it is not a reprokit archive")
    missing = [array_member(i) for i in range(array_count) if array_member(i) not in names]
    if missing:
        raise ArchiveError(f"archive is missing array payload {missing[0]!r}")


_SIGNATURE_KINDS = ("exception", "nonfinite", "output")


def check_manifest(manifest: Any) -> dict:
    """Validates the manifest's shape; raises ArchiveError naming the first problem."""
    if not isinstance(manifest, dict):
        raise ArchiveError("manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise ArchiveError("manifest.json is not a reprokit manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArchiveError("manifest.json has an invalid format_version")
    if version > FORMAT_VERSION:
        made_by = str(manifest.get("reprokit_version", "a newer version"))[:40]
        raise ArchiveError(
            f"archive uses format version {version}, newer than this reprokit reads ({FORMAT_VERSION}); "
            f"upgrade reprokit to {made_by} or later (pip install -U reprokit)"
        )
    _expect(manifest, "mode", str, lambda v: v in ("eager", "jit"))
    _expect(manifest, "note", str)
    _expect(manifest, "layer", dict)
    _expect(manifest["layer"], "keypath", str)
    _expect(manifest["layer"], "type", str)
    _expect(manifest, "call", dict)
    _expect(manifest, "signature", dict, lambda v: v.get("kind") in _SIGNATURE_KINDS)
    sig = manifest["signature"]
    if sig["kind"] == "exception":
        _expect(sig, "type", str)
        _expect(sig, "message", str)
    if sig["kind"] == "nonfinite":
        _expect(
            sig,
            "leaves",
            list,
            lambda v: all(isinstance(x, dict) and isinstance(x.get("path"), str) for x in v),
        )
    if "rtol" in sig and not isinstance(sig["rtol"], (int, float)):
        raise ArchiveError("manifest.json has an invalid signature tolerance")
    _expect(manifest, "arrays", dict)
    _expect(manifest["arrays"], "count", int, lambda v: 0 <= v < 10**9)
    _expect(manifest, "environment", dict)
    _expect(manifest, "modules", list, lambda v: all(isinstance(m, str) for m in v))
    return manifest


def _expect(obj: dict, key: str, kind: type, check=lambda v: True) -> None:
    value = obj.get(key)
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        and kind is not bool
        or not check(value)
    ):
        raise ArchiveError(f"manifest.json has a missing or invalid {key!r}")


def describe_signature(sig: dict) -> str:
    """One line for the recorded issue."""
    if sig["kind"] == "exception":
        return f"raises {sig['type']}: {sig['message']}"
    if sig["kind"] == "nonfinite":
        parts = []
        for leaf in sig["leaves"]:
            parts.append(
                f"{leaf['path']} ({leaf.get('nan', 0)} NaN, {leaf.get('posinf', 0) + leaf.get('neginf', 0)} Inf)"
            )
        return "non-finite output: " + ", ".join(parts)
    return "output values (the recorded output is the reference)"


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
