"""The Markdown snippet a reporter pastes into a GitHub issue next to the archive.

A maintainer triaging an issue reads its text before downloading anything,
so the snippet carries what decides whether to look further: the recorded
issue in one line, where the layer sits and what it was fed, the reporter's
environment, and the two commands that replay it. It is rendered from the
archive itself (manifest and encoded structure, no arrays, no jax), so
`reprokit issue` prints the same text for any archive, also one received
without its `.issue.md`.

GitHub refuses attachments over 25 MB; an archive that large gets a warning
at the top saying how to shrink it or where else to put it.
"""

from __future__ import annotations

import os
from typing import Any

from reprokit.archive import _format
from reprokit.record._encoding import TAG

# GitHub's limit for non-image attachments is "25 MB"; decimal megabytes are
# the stricter reading, so no archive that GitHub refuses goes unwarned.
GITHUB_ATTACHMENT_LIMIT = 25 * 1000 * 1000
_NAMED_ARRAY = "penzai.core.named_axes:NamedArray"
_MAX_INPUT_LINES = 12


def issue_path_for(archive: str | os.PathLike) -> str:
    """Where the snippet of `archive` goes: `NAME.issue.md` next to `NAME.repro.zip`."""
    archive = os.fspath(archive)
    for suffix in (".repro.zip", ".zip"):
        if archive.endswith(suffix):
            return archive[: -len(suffix)] + ".issue.md"
    return archive + ".issue.md"


def _array_text(desc: dict) -> str:
    from reprokit.views._inspect import key_shape

    if desc["kind"] == "key":
        shape = ",".join(str(s) for s in key_shape(desc))
        return f"key<{desc.get('key_impl')}>[{shape}]"
    return f"{desc['dtype']}[{','.join(str(s) for s in desc['shape'])}]"


def _named_array_parts(node: dict, arrays: list[dict]) -> tuple[dict, dict] | None:
    """(named_axes node, data descriptor) of a NamedArray node, or None if unusual."""
    fields = dict(node["f"])
    axes, data = fields.get("named_axes"), fields.get("data_array")
    if not (isinstance(axes, dict) and axes.get(TAG) in ("odict", "dict")):
        return None
    if not (isinstance(data, dict) and data.get(TAG) == "array"):
        return None
    index = data.get("i")
    if not isinstance(index, int) or not 0 <= index < len(arrays):
        return None
    return axes, arrays[index]


def _named_array_text(node: dict, arrays: list[dict]) -> str | None:
    """`NamedArray float32(2 | batch:1, seq:5)` as penzai prints it, or None if unusual."""
    parts = _named_array_parts(node, arrays)
    if parts is None:
        return None
    axes, desc = parts
    named = [f"{name}:{size}" for name, size in axes["v"]]
    # Named axes are the data array's trailing axes; any before are positional.
    positional = desc["shape"][: max(0, len(desc["shape"]) - len(named))]
    return (
        f"NamedArray {desc['dtype']}({', '.join(str(s) for s in positional)}"
        f"{' ' if positional else ''}| {', '.join(named)})"
    )


def input_descriptions(structure: dict) -> list[str]:
    """One line per array in the call's argument and side inputs: path and shape.

    Linear in the tree: a NamedArray is described whole, and its children are
    never visited (so thousands of NamedArray leaves cost no more than arrays).
    """
    from reprokit.archive._grammar import child_nodes, children

    arrays = structure["arrays"]
    lines: list[str] = []
    more = 0  # arrays past the lines shown: counted, never described, without paths
    for part in ("argument", "side_inputs"):
        if part not in structure["record"]:
            continue
        stack = [(part, structure["record"][part])]
        while stack:
            where, node = stack.pop()
            shown = len(lines) < _MAX_INPUT_LINES
            if isinstance(node, dict):
                if node.get(TAG) == "obj" and node.get("type") == _NAMED_ARRAY:
                    if not shown and _named_array_parts(node, arrays) is not None:
                        more += 1
                        continue
                    text = _named_array_text(node, arrays) if shown else None
                    if text is not None:
                        lines.append(f"{where}: {text}")
                        continue
                elif node.get(TAG) == "array":
                    index = node.get("i")
                    if isinstance(index, int) and 0 <= index < len(arrays):
                        if shown:
                            lines.append(f"{where}: {_array_text(arrays[index])}")
                        else:
                            more += 1
                    continue
            # Reversed so that lines come out in the tree's written order.
            if shown:
                stack.extend(reversed(children(node, where)))
            else:
                stack.extend((where, child) for child in reversed(child_nodes(node)))
    if more:
        lines.append(f"... {more} more arrays")
    return lines or ["(no arrays)"]


def environment_rows(env: dict) -> list[tuple[str, str]]:
    """The reporter's environment as (name, value) rows for a Markdown table."""
    from reprokit.environment._diff import _NUMERICS_DEFAULTS

    packages = env.get("packages") or {}
    backend = env.get("backend") or {}
    rows = [
        (
            "python",
            f"{env.get('python', '?')} ({env.get('python_implementation', '?')}) on "
            f"{env.get('os', '?')} {env.get('machine', '?')}",
        )
    ]
    for name in ("jax", "jaxlib", "penzai", "numpy", "ml_dtypes", "orbax-checkpoint"):
        rows.append((name, packages.get(name) or "not installed"))
    # Accelerator plugins carry their own XLA, so they matter when present.
    rows += [
        (name, version)
        for name, version in packages.items()
        if version and name.startswith(("jax-cuda", "jax-rocm", "libtpu"))
    ]
    if backend.get("platform"):
        device = (
            f"{backend['platform']}: {backend.get('device_count', '?')} x "
            f"{backend.get('device_kind', '?')}"
        )
        if backend.get("platform_version") not in (None, "", backend["platform"]):
            device += f" ({backend['platform_version']})"
        rows.append(("devices", device))
    else:
        rows.append(("devices", f"unavailable: {backend.get('error', 'unknown error')}"))
    config = env.get("jax_config") or {}
    changed = [
        f"{name}={config[name]!r}"
        for name, default in _NUMERICS_DEFAULTS.items()
        if name in config and config[name] != default
    ]
    rows.append(("numerics config", ", ".join(changed) if changed else "jax defaults"))
    if env.get("xla_flags"):
        rows.append(("XLA_FLAGS", " ".join(env["xla_flags"])))
    return [(name, code_cell(value)) for name, value in rows]


def code_cell(text: str) -> str:
    """Text as a Markdown table cell: a code span, so names stay literal, with pipes escaped."""
    # GitHub splits table cells on "|" even inside code spans.
    text = " ".join(str(text).split()).replace("`", "'")
    return f"`{text}`".replace("|", "\\|")


def one_line_summary(signature: dict) -> str:
    """The recorded issue as the snippet's first line says it."""
    if signature["kind"] == "exception":
        message = " ".join(signature["message"].split())
        if len(message) > 200:
            message = message[:197] + "..."
        return "raises " + code_cell(f"{signature['type'].removeprefix('builtins.')}: {message}")
    if signature["kind"] == "nonfinite":
        return "returns " + _format.describe_signature(signature)
    if signature["kind"] == "nonfinite_grad":
        return "has a finite forward pass and a backward pass that makes NaN/Inf (" + ", ".join(
            code_cell(leaf["path"]) for leaf in signature["leaves"][:4]
        ) + ("..." if len(signature["leaves"]) > 4 else "") + ")"
    return "returns output values the reporter considers wrong (recorded in the archive)"


def render_issue(
    manifest: dict,
    structure: dict,
    *,
    archive_name: str,
    archive_size: int,
    sha256: str,
    self_check: dict | None = None,
) -> str:
    """The Markdown snippet for an archive, from its manifest and encoded structure.

    `self_check` is what the replay after packing measured (`selfcheck.json`).
    """
    from reprokit.archive._provenance import found_by_lines, read_self_check, self_check_lines
    from reprokit.views import _script

    checked = read_self_check(self_check) if isinstance(self_check, dict) else None
    made = found_by_lines(manifest) + self_check_lines(checked, manifest)

    return _script.render_issue_text(
        manifest=manifest,
        layer_name=manifest["layer"]["type"].split(".")[-1],
        summary=one_line_summary(manifest["signature"]),
        inputs=[code_cell(line) for line in input_descriptions(structure)],
        backward=[code_cell(line) for line in _format.describe_backward(manifest)],
        environment=environment_rows(manifest["environment"]),
        archive_name=archive_name,
        archive_size=archive_size,
        sha256=sha256,
        too_large=archive_size > GITHUB_ATTACHMENT_LIMIT,
        limit_text="25 MB",
        made=[code_cell(line.strip()) for line in made],
    )


# Above this size pack leaves the sha256 out of the snippet: hashing re-reads the
# whole archive, which would cost nearly as much as writing it.
_PACK_TIME_HASH_LIMIT = 64 * 2**20


def issue_text(
    archive: str | os.PathLike, limits: Any = None, *, hash_limit: int | None = None
) -> dict[str, Any]:
    """Validates `archive` and returns its snippet with the facts behind it.

    Returns a dict with `markdown`, `archive`, `size`, `sha256` and
    `too_large` (over GitHub's attachment limit). Reads no array payloads and
    imports no jax. `limits` (an `reprokit.archive._container.Limits`) bounds what the
    archive may hold, as for `reprokit run`. Archives larger than `hash_limit`
    get no sha256 (None), which `reprokit issue` and `verify` print on demand.
    """
    from reprokit.archive._open import open_archive

    opened = open_archive(archive, limits)
    try:
        size = os.path.getsize(opened.path)
        too_big_to_hash = hash_limit is not None and size > hash_limit
        sha256 = None if too_big_to_hash else opened.reader.sha256()
    finally:
        opened.close()
    markdown = render_issue(
        opened.manifest,
        opened.structure,
        archive_name=os.path.basename(opened.path),
        archive_size=size,
        sha256=sha256,
        self_check=opened.self_check,
    )
    return {
        "archive": opened.path,
        "size": size,
        "sha256": sha256,
        "too_large": size > GITHUB_ATTACHMENT_LIMIT,
        "markdown": markdown,
    }


def _file_sha256(path: str) -> str:
    """The SHA-256 of a file as hex, read in chunks (as `ArchiveReader.sha256` computes it)."""
    import hashlib

    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_issue_snippet(
    archive: str | os.PathLike,
    *,
    manifest: dict | None = None,
    structure: dict | None = None,
    self_check: dict | None = None,
) -> str:
    """Writes `NAME.issue.md` next to `archive` (atomically) and returns its path.

    `pack` passes the `manifest` and `structure` it has just written, so the
    snippet is rendered without reopening the archive; without them the
    archive is opened and validated (`issue_text`).
    """
    from reprokit._errors import CaptureError

    path = issue_path_for(archive)
    if manifest is None or structure is None:
        text = issue_text(archive, hash_limit=_PACK_TIME_HASH_LIMIT)["markdown"]
    else:
        archive = os.fspath(archive)
        size = os.path.getsize(archive)
        text = render_issue(
            manifest,
            structure,
            archive_name=os.path.basename(archive),
            archive_size=size,
            sha256=None if size > _PACK_TIME_HASH_LIMIT else _file_sha256(archive),
            self_check=self_check,
        )
    try:
        from reprokit.views._script import write_atomically

        write_atomically(path, text.encode("utf-8"))
    except OSError as error:
        raise CaptureError(
            f"the archive is written, but its issue text {path!r} is not: "
            f"{error.strerror or error} (print it with: reprokit issue {archive})"
        ) from None
    return path
