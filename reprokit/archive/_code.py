"""The `code/` members of an archive: the reporter's bundled source, checked without importing it.

With `--bundle-code` an archive carries the reporter's own layer code under
`code/`, each file listed in the manifest with its module name and sha256.
Whether a maintainer ever imports it is the loader's decision
(`reprokit.record._bundle`, only with `--trust-code`); checking that the
listing and the members agree, byte for byte, is the archive layer's, so
that `verify` and `inspect` refuse a tampered bundle without loading jax.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from reprokit._errors import ArchiveError, RefusedTypeError
from reprokit.archive._allowlist import check_module_for_viewing
from reprokit.archive._format import check_text

CODE_PREFIX = "code/"
_MAX_FILES = 256
_MODULE_PART = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"code/((?:{_MODULE_PART}/)*{_MODULE_PART})\.py")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_KEYS = frozenset({"path", "module", "sha256", "bytes", "source"})
# Never served from an archive, even when trusted: a bundled `penzai` (or a
# dependency of reprokit) would silently replace the library itself.
NEVER_BUNDLED_ROOTS = frozenset(
    {"penzai", "treescope", "orbax", "tensorstore", "msgpack", "jinja2", "click", "etils"}
)



def code_files(manifest: dict) -> list[dict]:
    """The manifest's list of bundled files, validated; [] when the archive bundles no code."""
    section = manifest.get("code")
    if section is None:
        return []
    if not isinstance(section, dict) or not isinstance(section.get("files"), list):
        raise ArchiveError("manifest.json has a malformed 'code' section")
    files = section["files"]
    if len(files) > _MAX_FILES:
        raise ArchiveError("manifest.json lists too many bundled files")
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict) or set(entry) != _FILE_KEYS:
            raise ArchiveError("manifest.json has a malformed bundled file entry")
        path, module = entry["path"], entry["module"]
        match = _PATH.fullmatch(path) if isinstance(path, str) else None
        if match is None:
            raise ArchiveError("manifest.json names a bundled file outside code/ or not a .py")
        dotted = match.group(1).replace("/", ".").removesuffix(".__init__")
        if module != dotted or module in seen:
            raise ArchiveError(f"bundled file {path!r} does not hold module {str(module)[:60]!r}")
        check_module_for_viewing(module)
        if module.split(".")[0] in NEVER_BUNDLED_ROOTS:
            raise RefusedTypeError(
                f"archive bundles {module!r}, which reprokit never imports from an archive"
            )
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise ArchiveError(f"bundled file {path!r} has a malformed sha256")
        if (
            type(entry["bytes"]) is not int
            or entry["bytes"] < 0
            or not isinstance(entry["source"], str)
        ):
            raise ArchiveError(f"bundled file {path!r} has a malformed entry")
        seen.add(module)
    skipped = section.get("not_bundled", [])
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and all(isinstance(v, str) for v in s.values()) for s in skipped
    ):
        raise ArchiveError("manifest.json has a malformed 'code' section")
    return files


def bundled_modules(manifest: dict) -> tuple[str, ...]:
    """Modules the archive bundles (validated)."""
    return tuple(entry["module"] for entry in code_files(manifest))


def member_names(manifest: dict) -> set[str]:
    """Archive members that hold bundled code."""
    return {entry["path"] for entry in code_files(manifest)}


def check_members(reader: Any, manifest: dict) -> None:
    """Every `code/` member is listed, every listed one exists, and each has its recorded sha256."""
    files = {entry["path"]: entry for entry in code_files(manifest)}
    present = {name for name in reader.names if name.startswith(CODE_PREFIX)}
    if present != set(files):
        odd = sorted(present ^ set(files))[0]
        raise ArchiveError(f"bundled file {odd[:80]!r} is not both listed and present; refused")
    for entry in files.values():
        verified_source(reader, entry)


def verified_source(reader: Any, entry: dict) -> bytes:
    data = reader.read_bytes(entry["path"])
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ArchiveError(f"bundled file {entry['path']!r} does not match its sha256; refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"bundled file {entry['path']!r} is not UTF-8 text") from None
    # The source a maintainer reads must be the source that runs (no bidi
    # overrides or terminal controls making it display otherwise).
    check_text(entry["path"], text)
    return data


def describe(manifest: dict) -> list[str]:
    """Lines for `reprokit inspect`: the bundled files and how `run` treats them."""
    files = code_files(manifest)
    lines = []
    if files:
        lines.append(
            "bundled code (reprokit run imports it only with --trust-code; read it first):"
        )
        for entry in files:
            lines.append(
                f"  {entry['path']}  module {entry['module']}, {entry['bytes']} bytes, "
                f"sha256 {entry['sha256'][:16]}..., {entry['source']}"
            )
    for skipped in (manifest.get("code") or {}).get("not_bundled", []):
        lines.append(f"  not bundled: {skipped.get('module')} ({skipped.get('reason')})")
    return lines
