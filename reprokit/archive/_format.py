"""The archive format: member names, versions, and the manifest's schema.

Writer and reader agree on the layout through this module alone. The
manifest is checked here field by field before anything else reads it, so
the rest of the loader may trust its shape (never its content). This module
imports neither jax nor penzai: `reprokit inspect` and `verify` use it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from reprokit._errors import ArchiveError

FORMAT_NAME = "reprokit"
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,30}")
# A Flax module path as `reprokit.record._flax.flax_path` writes it (`Encoder/LayerNorm_0`).
FLAX_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,499}")


def flax_suffix(layer: dict) -> str:
    """` (Flax module Encoder/LayerNorm_0)` for a layer of penzai's Flax bridge, else ''."""
    path = layer.get("flax_path")
    return f" (Flax module {path})" if isinstance(path, str) and FLAX_PATH.fullmatch(path) else ""
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
STRUCTURE = "structure.msgpack"
REPLAY_SCRIPT = "replay.py"
README = "README.md"
REQUIREMENTS = "requirements.txt"
STABLEHLO = "stablehlo.mlirbc"
SELFCHECK = "selfcheck.json"
_ARRAY_MEMBER = re.compile(r"arrays/(0|[1-9][0-9]{0,8})\.bin")
_OPTIONAL_MEMBERS = frozenset({REPLAY_SCRIPT, README, REQUIREMENTS, STABLEHLO, SELFCHECK})


def array_member(index: int) -> str:
    """Member name of the `index`-th array payload."""
    return f"arrays/{index}.bin"


@functools.cache
def reprokit_version() -> str:
    """This reprokit's version (read once: the metadata lookup parses files, ~1 ms)."""
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
        if name in (MANIFEST, STRUCTURE) or name in _OPTIONAL_MEMBERS:
            continue
        raise ArchiveError(f"archive holds an unexpected member {name[:80]!r}; refused")
    for required in (MANIFEST, STRUCTURE):
        if required not in names:
            raise ArchiveError(f"archive has no {required}; it is not a reprokit archive")
    # Which array payloads must exist is known only from the structure's array
    # table (filled arrays have none): the loader checks that.


# The kinds of issue a manifest can record; `portable._verdict` (embedded in
# replay.py, which cannot import this) keeps an equal copy, and a test checks.
SIGNATURE_KINDS = ("exception", "nonfinite", "output", "nonfinite_grad")


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
        # Only a version number: free text here would be printed as advice.
        made_by = manifest.get("reprokit_version")
        if not isinstance(made_by, str) or not _VERSION.fullmatch(made_by):
            made_by = "a newer version"
        raise ArchiveError(
            f"archive uses format version {version}, newer than this reprokit reads ({FORMAT_VERSION}); "
            f"upgrade reprokit to {made_by} or later (pip install -U reprokit)"
        )
    _expect(manifest, "mode", str, lambda v: v in ("eager", "jit"))
    _expect(manifest, "note", str)
    _expect(manifest, "layer", dict)
    _expect(manifest["layer"], "keypath", str)
    _expect(manifest["layer"], "type", str)
    if "flax_path" in manifest["layer"]:
        # Printed beside the keypath everywhere (replay.py's comments too).
        _expect(manifest["layer"], "flax_path", str, FLAX_PATH.fullmatch)
    _check_identifier(manifest["layer"]["type"], "layer type", dotted=True)
    _check_identifier(manifest["layer"]["keypath"], "layer keypath", dotted=False)
    _expect(manifest, "call", dict)
    _expect(manifest, "signature", dict, lambda v: v.get("kind") in SIGNATURE_KINDS)
    sig = manifest["signature"]
    if sig["kind"] == "exception":
        _expect(sig, "type", str)
        _expect(sig, "message", str)
        _check_identifier(sig["type"], "exception type", dotted=True)
    if sig["kind"] in ("nonfinite", "nonfinite_grad"):
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
    _check_details(manifest)
    return manifest


# Lists in the manifest with one entry per array or argument: kept on one line
# each, so that the manifest's size and the time to write it do not grow
# sixfold with the leaf count (indented JSON is also written by Python's slow
# encoder, not the C one).
_LONG_LISTS = (("stablehlo", "in_avals"), ("stablehlo", "out_avals"))


def manifest_text(manifest: dict) -> str:
    """The manifest as stored: indented JSON, keys sorted, per-argument lists on one line each."""
    import uuid

    short = dict(manifest)
    spliced = {}
    for section, field in _LONG_LISTS:
        if isinstance(short.get(section), dict) and field in short[section]:
            marker = f"reprokit-{uuid.uuid4().hex}"
            spliced[json.dumps(marker)] = json.dumps(short[section][field], sort_keys=True)
            short[section] = {**short[section], field: marker}  # the caller's dict untouched
    text = json.dumps(short, indent=1, sort_keys=True)
    for marker, value in spliced.items():
        text = text.replace(marker, value, 1)
    return text


def parse_manifest(data: bytes) -> dict:
    """Parses and checks `manifest.json` strictly; raises ArchiveError naming the problem.

    Stricter than `json.loads`: UTF-8 only, no NaN/Infinity (not JSON, and
    NaN compares unequal to everything a check might test), and no repeated
    keys (another reader would see the other value).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError("manifest.json is not UTF-8 text") from None
    try:
        manifest = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique,
        )
    except (ValueError, RecursionError):
        raise ArchiveError("manifest.json is not valid JSON") from None
    try:
        return check_manifest(manifest)
    except RecursionError:
        raise ArchiveError("manifest.json is nested too deeply") from None


# MLIR bytecode starts with these four bytes.
_MLIR_BYTECODE_MAGIC = b"ML\xefR"


def check_optional_member(name: str, data: bytes) -> None:
    """Refuses an optional member whose bytes are not what its name says."""
    if name == STABLEHLO:
        if not data.startswith(_MLIR_BYTECODE_MAGIC):
            raise ArchiveError(f"member {name!r} is not MLIR bytecode")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"member {name!r} is not UTF-8 text") from None
    check_text(name, text)
    if name.endswith(".json"):
        try:
            value = json.loads(
                text,
                parse_constant=_refuse_constant,
                parse_float=_finite_float,
                object_pairs_hook=_unique,
            )
        except (ValueError, RecursionError):
            raise ArchiveError(f"member {name!r} is not valid JSON") from None
        if not isinstance(value, dict):
            raise ArchiveError(f"member {name!r} is not a JSON object")
    if name == REQUIREMENTS:
        check_requirements(text)


# What a maintainer reads must be what runs: control characters (other than
# newline and tab) can hide lines from a terminal or a diff, and bidi controls
# and line separators make source display in another order than Python
# parses it ("Trojan Source").
_TEXT_CONTROLS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def text_problem(text: str) -> str | None:
    """Why `text` may not be an archive's text member (None when it may): its first control character."""
    found = _TEXT_CONTROLS.search(text)
    if found is None:
        return None
    return f"holds the control character U+{ord(found.group()):04X} at offset {found.start()}"


def check_text(name: str, text: str) -> None:
    """Refuses a text member holding control characters other than newline and tab."""
    problem = text_problem(text)
    if problem is not None:
        raise ArchiveError(f"member {name!r} {problem}; text members allow only newline and tab")


# The packages requirements.txt may pin (what `render_requirements` writes),
# each as `name==version`; `flax` and `tensorstore` may also appear bare.
# No options (`--index-url`), URLs, paths, markers or VCS requirements: pip
# would act on any of them when a maintainer installs the archive's pins.
PINNED_PACKAGES = ("jax", "jaxlib", "penzai", "numpy", "ml_dtypes", "flax")
_UNPINNED_PACKAGES = ("flax", "tensorstore")
_PIN_VERSION = r"[0-9][0-9A-Za-z.+!_-]{0,39}"
_REQUIREMENT = re.compile(
    rf"(?:{'|'.join(PINNED_PACKAGES)})=={_PIN_VERSION}|{'|'.join(_UNPINNED_PACKAGES)}"
)


def check_requirements(text: str) -> None:
    """Refuses a requirements.txt with anything but reprokit's own pins, one per line."""
    lines = text.split("\n")
    if lines[-1] != "":
        raise ArchiveError(f"member {REQUIREMENTS!r} does not end with a newline")
    for number, line in enumerate(lines[:-1], 1):
        if not _REQUIREMENT.fullmatch(line):
            raise ArchiveError(
                f"member {REQUIREMENTS!r} line {number} is not a pin reprokit writes "
                f"(only name==version for {', '.join(PINNED_PACKAGES)}): {brief_text(line)}"
            )


# Characters that act on a terminal or reorder what it shows: C0/C1 controls
# (newline and tab aside), DEL, bidi controls, zero-width characters and line
# separators. Everything reprokit prints from an archive passes through
# `terminal_safe` or `one_line` (SECURITY.md, class 7).
_UNSAFE_IN_TERMINAL = re.compile(
    "[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f\\u061c\\u200b-\\u200f\\u2028-\\u202e\\u2060-\\u2069\\ufeff]"
)


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """`text` with every control, bidi and invisible character written as an escape; lines kept."""
    return _UNSAFE_IN_TERMINAL.sub(_escaped, text)


def one_line(text: str) -> str:
    """`text` as one printable line: `terminal_safe`, and newlines and tabs escaped too."""
    return terminal_safe(str(text)).replace("\n", "\\n").replace("\t", "\\t")


def markdown_fence(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`, so `text` cannot close it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)


# Identifiers a manifest names and every view prints, often inside `code`
# spans or table cells: a dotted Python name, and a keypath of printable
# characters without backticks or table bars (no line breaks, no escapes).
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.(?:<locals>|[A-Za-z_][A-Za-z0-9_]*))*")
_MAX_IDENTIFIER = 1000


def _check_identifier(value: str, what: str, *, dotted: bool) -> None:
    if dotted:
        ok = len(value) <= _MAX_IDENTIFIER and _DOTTED_NAME.fullmatch(value) is not None
    else:
        ok = (
            len(value) <= _MAX_IDENTIFIER
            and value.isprintable()
            and not any(char in value for char in "`|\u2028\u2029")
        )
    if not ok:
        raise ArchiveError(f"manifest.json has a malformed {what}: {brief_text(value)}")


def brief_text(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message: escaped, and cut to `limit` characters."""
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _refuse_constant(name: str) -> Any:
    raise ArchiveError(f"manifest.json holds {name}, which is not valid JSON")


def _finite_float(text: str) -> float:
    # `1e999` is valid JSON that Python reads as infinity; a manifest number
    # must be finite however it is spelled (SECURITY.md, class 9).
    value = float(text)
    if not math.isfinite(value):
        raise ArchiveError(
            f"manifest.json holds the number {text[:40]!r}, which is not finite; refused"
        )
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ArchiveError(f"manifest.json repeats the key {repeated[:40]!r}")
    return result


# C0/C1 controls other than tab and newline: ESC sequences in a note or a
# message would be interpreted by the maintainer's terminal when `inspect`
# prints them (cursor moves hiding text, OSC 52 clipboard writes).
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without the control characters the manifest refuses (packing side).

    Bidi controls and line separators go too: README.md repeats manifest
    strings, and text members refuse them.
    """
    return _TEXT_CONTROLS.sub("", text)
# What reprokit run sets before jax starts must never name a place on the
# maintainer's machine: XLA writes dumps to, or loads kernels and autotuning
# results from, the locations these flags give. Packing records such values
# as placeholders, which replay drops.
_XLA_FLAG = re.compile(r"--xla_[a-z0-9_]+(?:=\S*)?")
_XLA_LOCATION_FLAG = re.compile(r"(?:_to|_dir|_path|_file|_from|filename)$")
_PLACEHOLDER = re.compile(r"<(?:home|user|host|redacted|path|uuid)>")
# A packed manifest nests about five levels; this leaves room to grow.
_MAX_MANIFEST_DEPTH = 32


def _check_details(manifest: dict) -> None:
    """The manifest fields that `inspect` and `run` read beyond the required ones."""
    stack: list[tuple[Any, int]] = [(manifest, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_MANIFEST_DEPTH:
            # Code that prints or compares the manifest recurses into it.
            raise ArchiveError("manifest.json is nested too deeply")
        if isinstance(value, dict):
            stack.extend((key, depth + 1) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and _TERMINAL_CONTROLS.search(value):
            raise ArchiveError("manifest.json holds a control character (a terminal escape?)")
    from reprokit.archive._allowlist import brief, check_module_for_viewing

    for module in manifest["modules"]:
        check_module_for_viewing(module)
    for key in ("index", "count"):
        if key in manifest["call"]:
            _expect(manifest["call"], key, int, lambda v: 0 <= v < 2**31)
    sig = manifest["signature"]
    if sig["kind"] in ("nonfinite", "nonfinite_grad"):
        for leaf in sig["leaves"]:
            _check_identifier(leaf["path"], "leaf path", dotted=False)
            for key in ("nan", "posinf", "neginf"):
                if key in leaf:
                    _expect(leaf, key, int)
    if "exception_traceback" in manifest:
        _expect(manifest, "exception_traceback", list, lambda v: all(isinstance(x, str) for x in v))
    if "bytes" in manifest["arrays"]:
        _expect(manifest["arrays"], "bytes", int, lambda v: v >= 0)
    env = manifest["environment"]
    for key in ("packages", "backend", "jax_config", "env_vars"):
        if key in env:
            _expect(env, key, dict)
    if "xla_flags" in env:
        _expect(env, "xla_flags", list)
        flags = env["xla_flags"]
        if len(flags) > MAX_XLA_FLAGS:
            raise ArchiveError(
                f"manifest.json records {len(flags)} XLA flags; at most {MAX_XLA_FLAGS} are read"
            )
        for flag in flags:
            if isinstance(flag, str) and (
                len(flag) > MAX_XLA_FLAG_LENGTH or any(char in flag for char in "\"'\\")
            ):
                raise ArchiveError(
                    f"manifest.json records a malformed XLA flag {brief(flag)} "
                    f"(quoted, or over {MAX_XLA_FLAG_LENGTH} characters)"
                )
        for flag in flags:
            if not isinstance(flag, str) or not _XLA_FLAG.fullmatch(flag):
                raise ArchiveError(f"manifest.json records a malformed XLA flag {brief(flag)}")
            name, _, value = flag.partition("=")
            if (
                value
                and not _PLACEHOLDER.search(value)
                and (
                    _XLA_LOCATION_FLAG.search(name) or "/" in value or "\\" in value or "~" in value
                )
            ):
                raise ArchiveError(
                    f"manifest.json records the XLA flag {flag[:80]!r}, which would make XLA "
                    "read or write files on this machine; refused"
                )
        if xla_tokens(" ".join(flags)) != flags:
            raise ArchiveError("manifest.json records XLA flags that XLA would read differently")


# What reprokit run would set is `" ".join(flags)`; XLA reads that string with
# its own tokenizer (xla/parse_flags_from_env.cc), in which a quoted value
# ends a flag (`--a="x"--b=y` is two flags). Flags without quotes, backslashes
# or whitespace tokenize back to themselves, so each recorded flag is exactly
# one flag to XLA (SECURITY.md, class 4); `xla_tokens` is the port that checks it.
MAX_XLA_FLAGS = 64
MAX_XLA_FLAG_LENGTH = 256
_XLA_WHITESPACE = " \t\n\r\v\f"


def xla_tokens(text: str) -> list[str]:
    """The flags XLA reads from an `XLA_FLAGS` value, as its parser forms them."""
    tokens: list[str] = []
    size = len(text)
    start = _skip(text, 0, whitespace=True)
    while start < size and text[start] == "-":
        end = start
        while end < size and text[end].isascii() and (text[end] in "-_" or text[end].isalnum()):
            end += 1
        if end < size and text[end] == "=" and end + 1 < size and text[end + 1] in "'\"":
            name_end = end + 1
            quote = text[end + 1]
            end += 2
            value = []
            while end < size and text[end] != quote:
                if quote == '"' and text[end] == "\\" and end + 1 < size:
                    end += 1
                value.append(text[end])
                end += 1
            if end < size:
                end += 1  # the closing quote: the next flag may start right here
            tokens.append(text[start:name_end] + "".join(value))
        else:
            end = _skip(text, end, whitespace=False)
            tokens.append(text[start:end])
        start = _skip(text, end, whitespace=True)
    return tokens


def _skip(text: str, position: int, *, whitespace: bool) -> int:
    while position < len(text) and (text[position] in _XLA_WHITESPACE) == whitespace:
        position += 1
    return position


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
        return f"raises {sig['type']}: {one_line(sig['message'])}"
    if sig["kind"] == "nonfinite":
        parts = []
        for leaf in sig["leaves"]:
            parts.append(
                f"{leaf['path']} ({leaf.get('nan', 0)} NaN, {leaf.get('posinf', 0) + leaf.get('neginf', 0)} Inf)"
            )
        return "non-finite output: " + ", ".join(parts)
    if sig["kind"] == "nonfinite_grad":
        parts = [
            f"{leaf['path']} ({leaf.get('nan', 0)} NaN, "
            f"{leaf.get('posinf', 0) + leaf.get('neginf', 0)} Inf)"
            for leaf in sig["leaves"]
        ]
        return "gradient issue: finite forward pass, non-finite gradients: " + ", ".join(parts)
    return "output values (the recorded output is the reference)"


_MAX_BACKWARD_LINES = 24


def describe_backward(manifest: dict) -> list[str]:
    """Lines on a gradient issue's backward pass: the cotangent at the output, each gradient.

    From the manifest's `backward` section (statistics `pack(grad=...)`
    wrote); empty for other archives. The section is archive data: only its
    numbers and short, bounded names are printed.
    """
    backward = manifest.get("backward")
    if not isinstance(backward, dict):
        return []
    lines = []
    for title, key in (
        ("cotangent at the layer's output", "output_cotangent"),
        ("gradient the layer produced", "gradients"),
    ):
        items = backward.get(key)
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            counts = [
                f"{_count(item, name)} {label}"
                for name, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
                if _count(item, name)
            ]
            shape = item.get("shape")
            shape_text = (
                "[" + ",".join(str(n) for n in shape) + "]"
                if isinstance(shape, list) and all(type(n) is int for n in shape)
                else ""
            )
            dtype = item.get("dtype") if isinstance(item.get("dtype"), str) else ""
            max_abs = item.get("max_abs")
            size = f", max |finite| {max_abs:.3g}" if type(max_abs) in (int, float) else ""
            lines.append(
                f"{title}: {brief_text(str(item.get('path', '?')), 80)} {dtype[:16]}{shape_text}: "
                + (", ".join(counts) if counts else "finite")
                + size
            )
    if len(lines) > _MAX_BACKWARD_LINES:
        lines = lines[:_MAX_BACKWARD_LINES] + [f"... ({len(lines) - _MAX_BACKWARD_LINES} more)"]
    return lines


def _count(item: dict, name: str) -> int:
    value = item.get(name)
    return value if type(value) is int and value >= 0 else 0


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
