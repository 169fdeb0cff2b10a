"""A look inside an archive without running, or even rebuilding, anything.

`reprokit inspect` is what a careful maintainer runs first on an archive
from a stranger: it reads the manifest and the encoded structure and prints
them as text, resolving no names, importing no jax, and calling no code.
"""

from __future__ import annotations

from typing import Any

from reprokit import _format
from reprokit._encoding import TAG

_MAX_OUTLINE_LINES = 400


def outline(
    node: Any, arrays: list[dict], label: str = "", depth: int = 0, out: list | None = None
) -> list[str]:
    """An indented outline of an encoded tree: type names, containers and array shapes."""
    out = [] if out is None else out
    if len(out) >= _MAX_OUTLINE_LINES:
        return out
    pad = "  " * depth
    prefix = f"{pad}{label}: " if label else pad
    if isinstance(node, list):
        out.append(f"{prefix}list[{len(node)}]")
        for i, item in enumerate(node):
            outline(item, arrays, f"[{i}]", depth + 1, out)
        return out
    if not isinstance(node, dict):
        text = repr(node)
        out.append(prefix + (text if len(text) <= 80 else text[:77] + "..."))
        return out
    tag = node.get(TAG)
    if tag == "obj":
        out.append(f"{prefix}{_short(node['type'])}")
        for name, value in node["f"]:
            outline(value, arrays, name, depth + 1, out)
    elif tag == "array":
        out.append(prefix + array_label(arrays, node["i"]))
    elif tag in ("tuple",):
        out.append(f"{prefix}tuple[{len(node['v'])}]")
        for i, item in enumerate(node["v"]):
            outline(item, arrays, f"[{i}]", depth + 1, out)
    elif tag in ("dict", "odict"):
        out.append(f"{prefix}{'OrderedDict' if tag == 'odict' else 'dict'}[{len(node['v'])}]")
        for key, value in node["v"]:
            outline(value, arrays, f"[{key!r}]", depth + 1, out)
    elif tag in ("fn", "type"):
        out.append(f"{prefix}{node['name'].replace(':', '.')}")
    elif tag == "enum":
        out.append(f"{prefix}{_short(node['type'])}.{node['name']}")
    elif tag == "partial":
        out.append(f"{prefix}functools.partial")
        outline(node["fn"], arrays, "func", depth + 1, out)
        for key, value in node["kw"]:
            outline(value, arrays, key, depth + 1, out)
    elif tag in ("jnp_type", "np_type", "dtype", "builtin_type"):
        out.append(f"{prefix}{tag}:{node['name']}")
    else:
        out.append(f"{prefix}<{tag}>")
    if len(out) == _MAX_OUTLINE_LINES:
        out.append(f"{pad}... (outline truncated)")
    return out


def _short(name: str) -> str:
    module, qualname = name.split(":", 1) if ":" in name else ("", name)
    return f"{module}.{qualname}" if module and not module.startswith("penzai.") else qualname


def array_label(arrays: list[dict], index: Any) -> str:
    if not isinstance(index, int) or not 0 <= index < len(arrays):
        return f"array #{index} (missing)"
    desc = arrays[index]
    extra = (
        f" key<{desc.get('key_impl')}>"
        if desc["kind"] == "key"
        else " weak"
        if desc.get("weak_type")
        else ""
    )
    shape = ",".join(str(s) for s in desc["shape"])
    kind = "np." if desc["kind"] == "numpy" else ""
    return f"{kind}{desc['dtype']}[{shape}]{extra}  (array #{index})"


def describe_archive(manifest: dict, structure: dict, sha256: str) -> str:
    """The text `reprokit inspect` prints."""
    from reprokit._environment import format_environment_summary

    layer, call = manifest["layer"], manifest["call"]
    lines = [
        f"archive: reprokit format {manifest['format_version']}, packed by reprokit "
        f"{manifest.get('reprokit_version', '?')} on {manifest.get('created', '?')}",
        f"sha256: {sha256}",
        f"recorded issue: {_format.describe_signature(manifest['signature'])}",
        f"layer: {layer['type']} at {layer['keypath']}",
        f"call: {call.get('index', 0) + 1} of {call.get('count', 1)}, captured {manifest['mode']}",
    ]
    if manifest["note"]:
        lines.append(f"note: {manifest['note']}")
    if manifest["modules"]:
        lines.append(
            "needs your modules: "
            + ", ".join(manifest["modules"])
            + " (replay with --allow-module for each, only if you trust them)"
        )
    if manifest.get("exception_traceback"):
        lines.append("traceback at capture:")
        lines += [f"  {line}" for line in manifest["exception_traceback"]]
    lines.append("environment:")
    lines += [
        "  " + line for line in format_environment_summary(manifest["environment"]).splitlines()
    ]
    arrays = structure["arrays"]
    total = sum(d["nbytes"] for d in arrays)
    lines.append(f"arrays: {len(arrays)} ({_format.human_bytes(total)})")
    lines.append("structure:")
    for name, node in structure["record"].items():
        lines += ["  " + line for line in outline(node, arrays, name)]
    return "\n".join(lines)
