"""The grammar of an encoded record, defined once: node kinds, their keys, their children.

`structure.msgpack` holds a tree of plain msgpack values in which every
non-plain node is a small map tagged by `"$t"`. Four parts of reprokit read
that tree without rebuilding it: `verify` (every key checked, nothing
imported), `inspect` (paths to arrays), the issue snippet (its inputs) and
bundling (which names a bundle must provide); the encoder writes it (and
reports the names it wrote, which `named` would find) and the decoder reads
it. If each of them spelled the grammar itself, an archive could say one
thing to `verify` and another to the loader. So the
node kinds, their exact keys, how to reach a node's children and which
class or function a node names all live here, and everything else asks.

Parsing is bounded here too: msgpack's own limits cap every string and
container before the tree exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack

from reprokit._errors import ArchiveError
from reprokit.archive._collector import collector_paused

TAG = "$t"
MAX_DEPTH = 200
MAX_STRING = 1 << 20
MAX_NODES = 5_000_000

# The keys each node kind has, exactly as the encoder writes them. Anything
# else (a stray key, a missing one) is refused by `verify`: a decoder that
# ignored extra keys would let an archive say different things to different
# readers.
NODE_KEYS: dict[str, frozenset[str]] = {
    tag: frozenset({TAG, *keys})
    for tag, keys in {
        "tuple": ("v",),
        "dict": ("v",),
        "odict": ("v",),
        "int": ("v",),
        "array": ("i",),
        "scalar": ("dtype", "v"),
        "obj": ("type", "f"),
        "enum": ("type", "name"),
        "fn": ("name",),
        "partial": ("fn", "args", "kw"),
        "type": ("name",),
        "jnp_type": ("name",),
        "np_type": ("name",),
        "dtype": ("name",),
        "builtin_type": ("name",),
        "slice": ("v",),
        "complex": ("v",),
        "frozenset": ("v",),
        # A reviewed `jax.nn.initializers` factory called with keyword
        # arguments: how an initializer closure (`lecun_normal()`) is recorded.
        "initializer": ("factory", "kw"),
    }.items()
}

# Node kinds that name a class (`module:qualname`) and the key holding it.
_CLASS_NAME_KEY = {"obj": "type", "enum": "type", "type": "name"}
_FUNCTION_NAME_KEY = {"fn": "name", "initializer": "factory"}


def children(node: Any, where: str = "") -> list[tuple[str, Any]]:
    """A node's children with Python-like paths (`.field`, `[i]`, `['key']`), in written order.

    Assumes the node has the keys its kind requires (`verify` checks that
    first on untrusted trees); plain values have no children.
    """
    if isinstance(node, list):
        return [(f"{where}[{i}]", item) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return []
    tag = node.get(TAG)
    if tag is None:
        # Not a node but a record's table of parts ({"submodel": ..., "argument": ...}).
        return [(f"{where}.{name}" if where else str(name), value) for name, value in node.items()]
    if tag in ("tuple", "slice", "complex"):
        return [(f"{where}[{i}]", item) for i, item in enumerate(node["v"])]
    if tag == "frozenset":
        return [(f"{where}<item {i}>", item) for i, item in enumerate(node["v"])]
    if tag == "initializer":
        return [(f"{where}.{name}", value) for name, value in node["kw"]]
    if tag in ("dict", "odict"):
        found = []
        for i, (key, value) in enumerate(node["v"]):
            if _plain_key(key):
                found.append((f"{where}[{key!r}]", value))
            else:
                # An encoded key (a tuple, an enum) is a node too, and may name a class.
                found.append((f"{where}.keys()[{i}]", key))
                found.append((f"{where}[<key {i}>]", value))
        return found
    if tag == "obj":
        return [(f"{where}.{name}", value) for name, value in node["f"]]
    if tag == "partial":
        return (
            [(f"{where}.func", node["fn"])]
            + [(f"{where}.args[{i}]", arg) for i, arg in enumerate(node["args"])]
            + [(f"{where}.keywords[{name!r}]", value) for name, value in node["kw"]]
        )
    return []


def child_nodes(node: Any) -> list[Any]:
    """A node's children without paths (the cheap form of `children`, for checks over big trees)."""
    if isinstance(node, list):
        return node
    if not isinstance(node, dict):
        return []
    tag = node.get(TAG)
    if tag is None:
        # Not a node but a record's table of parts ({"submodel": ..., "argument": ...}).
        return list(node.values())
    if tag in ("tuple", "slice", "complex", "frozenset"):
        return node["v"]
    if tag == "initializer":
        return [value for _, value in node["kw"]]
    if tag in ("dict", "odict"):
        return [item for pair in node["v"] for item in pair]
    if tag == "obj":
        return [value for _, value in node["f"]]
    if tag == "partial":
        return [node["fn"], *node["args"], *(value for _, value in node["kw"])]
    return []


# The exact types msgpack parses plain values into: one set lookup decides
# most nodes of a big tree.
PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes})


def _plain_key(key: Any) -> bool:
    return key is None or isinstance(key, (bool, int, float, str))


def walk(root: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (path, node) for every node of an encoded tree, parents before children.

    Iterative, so a deep tree cannot exhaust the stack: depth is data.
    """
    stack = [(where, root)]
    pop, extend = stack.pop, stack.extend
    while stack:
        path, node = pop()
        yield path, node
        # Array nodes and plain values, most of a big record, have no children.
        if type(node) is dict:
            if node.get(TAG) == "array":
                continue
        elif type(node) is not list:
            if type(node) in PLAIN_TYPES:
                continue
        # Reversed so that the stack yields children in their written order.
        extend(reversed(children(node, path)))


def named_class(node: Any) -> str | None:
    """The `module:qualname` of the class a node names, if it names one."""
    key = _CLASS_NAME_KEY.get(node.get(TAG)) if isinstance(node, dict) else None
    name = node.get(key) if key else None
    return name if isinstance(name, str) else None


def named_function(node: Any) -> str | None:
    """The `module:qualname` of the function a node names, if it names one."""
    key = _FUNCTION_NAME_KEY.get(node.get(TAG)) if isinstance(node, dict) else None
    name = node.get(key) if key else None
    return name if isinstance(name, str) else None


def named(tree: Any) -> Iterator[str]:
    """Every class and function name (`module:qualname`) a tree names, in walk order."""
    # `walk` without its paths: building a path string per node is most of a walk's cost.
    stack = [tree]
    pop, extend = stack.pop, stack.extend
    while stack:
        node = pop()
        if isinstance(node, list):
            extend(reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        tag = node.get(TAG)
        if tag == "array":  # most nodes of a big record: no name, no children
            continue
        key = _CLASS_NAME_KEY.get(tag) or _FUNCTION_NAME_KEY.get(tag)
        name = node.get(key) if key else None
        if isinstance(name, str):
            yield name
        extend(reversed(child_nodes(node)))


def pack_bytes(node: Any) -> bytes:
    """Serialises encoded data with msgpack (bin type for bytes, no extension types)."""
    return msgpack.packb(node, use_bin_type=True, strict_types=False)


# Memory before parsing (SECURITY.md, class 6). One byte of msgpack can be
# an empty list or map, which costs Python about 72 bytes: 60 MB of them once
# took 4.5 GiB. So the structure member is capped (a record's structure is
# KiBs to a few hundred KiB: arrays live in their own members), and the
# containers built while parsing are counted and capped (one per 8 bytes of
# the cap), which together bound the parse to tens of bytes per input byte.
MAX_STRUCTURE_BYTES = 8 * 2**20
_BYTES_PER_CONTAINER = 8


def max_containers(max_bytes: int) -> int:
    """How many lists and maps a structure of at most `max_bytes` may build."""
    return max(1024, max_bytes // _BYTES_PER_CONTAINER)


class _TooManyContainers(Exception):
    pass


# The first byte of every msgpack list and map: fixmap, fixarray, array 16/32,
# map 16/32. Each container starts with one of these bytes at its own offset,
# so counting them bounds how many containers a parse can build.
_CONTAINER_MARKERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_CONTAINER_MARKERS = bytes(sorted(set(range(256)) - set(_CONTAINER_MARKERS)))


def _containers_at_most(data: Any) -> int | None:
    """An upper bound on the lists and maps `data` can parse into (None if not bytes)."""
    if not isinstance(data, (bytes, bytearray)):
        return None
    return len(data.translate(None, _NOT_CONTAINER_MARKERS))


def _map_from_pairs(pairs: list) -> dict:
    # A loop, not `dict(pairs)` and a check after: it measured faster on
    # the small maps a structure is made of.
    result = {}
    for key, value in pairs:
        if not isinstance(key, str) or key in result:
            raise ValueError("a map key is not a string, or repeats")
        result[key] = value
    return result


def unpack_bytes(data: bytes, *, containers: int | None = None) -> Any:
    """Parses msgpack with every size bounded; refuses extension types and non-string map keys.

    At most `containers` lists and maps are built (default: what a structure
    at `MAX_STRUCTURE_BYTES` may build).
    """
    limit = containers if containers is not None else max_containers(MAX_STRUCTURE_BYTES)
    hooks: dict[str, Any] = {"object_pairs_hook": _map_from_pairs}
    bound = _containers_at_most(data)
    if bound is None or bound > limit:
        # The bytes alone do not rule out a flood: count containers as they are built.
        budget = [limit]

        def spend() -> None:
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooManyContainers

        def on_list(items: list) -> list:
            spend()
            return items

        def on_map(pairs: list) -> dict:
            spend()
            return _map_from_pairs(pairs)

        hooks = {"object_pairs_hook": on_map, "list_hook": on_list}

    # The cyclic garbage collector would rescan every container built so far
    # each few hundred allocations (a flood of a million lists took 26 s);
    # what msgpack builds holds no cycles, so it is paused while parsing.
    try:
        with collector_paused():
            return msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=MAX_STRING,
                max_bin_len=MAX_STRING,
                max_array_len=MAX_NODES,
                max_map_len=MAX_NODES,
                max_ext_len=0,
                **hooks,
            )
    except _TooManyContainers:
        raise ArchiveError(
            f"structure holds more than {limit} lists and maps; refused while parsing"
        ) from None
    except RecursionError:
        raise ArchiveError("structure is nested too deeply") from None
    except Exception as error:  # msgpack raises many types for bad input
        raise ArchiveError(f"structure is not valid msgpack ({type(error).__name__})") from None
