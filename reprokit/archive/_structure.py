"""The static walk over a record's structure: every node checked, nothing imported.

`structure.msgpack` is the part of an archive that names classes and
functions. Before anything is rebuilt, every node is checked against the
grammar (`reprokit.archive._grammar`: exact keys per node kind, bounded
depth and node count), every name against the allow-list *by the rules
alone* (syntax, module prefix, deny list), and the array table against the
manifest. `open_archive` runs this for every command, so `inspect` and
`run` refuse what `verify` refuses. What cannot be decided without importing
(that a name really is a class of that module, that a field list matches
the class) is left to the loader, which checks it again while rebuilding.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

import msgpack

from reprokit._errors import ArchiveError, RefusedTypeError
from reprokit.archive._allowlist import (
    INITIALIZER_FACTORIES,
    AllowList,
    brief,
    check_name_for_viewing,
)
from reprokit.archive._descriptors import dtype_from_name
from reprokit.archive._grammar import (
    MAX_DEPTH,
    MAX_NODES,
    NODE_KEYS,
    PLAIN_TYPES,
    TAG,
    child_nodes,
)

RECORD_PARTS = (
    "submodel",
    "argument",
    "side_inputs",
    "initial_var_values",
    "output",
    "final_var_values",
    "output_cotangent",
    "gradients",
)
# Parts every record has; "output" and "final_var_values" exist exactly when
# the recorded issue is not an exception, and the backward pass's parts (the
# cotangent that reached the layer's output, the gradients it produced)
# exactly when it is a gradient issue.
_ALWAYS = frozenset(RECORD_PARTS[:4])
_AFTER_SUCCESS = frozenset(RECORD_PARTS[4:6])
_BACKWARD = frozenset(RECORD_PARTS[6:])

_BUILTIN_TYPE_NAMES = frozenset({"int", "float", "bool", "str", "complex", "bytes", "NoneType"})
_MAX_BIG_INT_DIGITS = 4000
_MAX_SHORT_NAME = 64


# Names remembered as accepted per check; more are checked without being remembered.
_MAX_NAMES = 4096


class _NameRules:
    """Checks class and function names statically: full allow-list, or view-only rules.

    The rules are a function of the name alone, and a model names a few
    dozen classes thousands of times: each accepted name is checked once.
    """

    def __init__(self, allow: AllowList | None):
        self._allow = allow
        self._types: set[str] = set()
        self._callables: set[str] = set()

    def type_name(self, name: Any) -> None:
        if type(name) is str and name in self._types:
            return
        if self._allow is None:
            check_name_for_viewing(name, "type")
        else:
            self._allow.check_type_name(name)
        if type(name) is str and len(self._types) < _MAX_NAMES:
            self._types.add(name)

    def callable_name(self, name: Any) -> None:
        if type(name) is str and name in self._callables:
            return
        if self._allow is None:
            check_name_for_viewing(name, "function")
        else:
            self._allow.check_callable_name(name)
        if type(name) is str and len(self._callables) < _MAX_NAMES:
            self._callables.add(name)


def _name_value_pairs(items: Any, *, public: bool = False) -> bool:
    """Whether `items` is a list of [identifier, value] pairs (fields, keyword arguments)."""
    if not isinstance(items, list) or not _pairs(items):
        return False
    # A loop, not all() over a generator: this runs for every object node.
    for name, _ in items:
        if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
            return False
        if public and name.startswith("_"):
            return False
    return True


def _pairs(items: list) -> bool:
    """Whether every item is a two-item list (a dict's key and value)."""
    for item in items:
        if not isinstance(item, list) or len(item) != 2:
            return False
    return True


def _malformed(tag: str, why: str) -> ArchiveError:
    return ArchiveError(f"structure has a malformed {tag!r} node ({why})")


def _short_name(node: dict, tag: str) -> str:
    name = node["name"]
    if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
        raise _malformed(tag, "its name is not an identifier")
    if name.startswith("_") or len(name) > _MAX_SHORT_NAME:
        raise _malformed(tag, "its name is private or too long")
    return name


# Subclasses of the plain types (from in-memory trees) take the isinstance path.
_LEAF_TYPES = (bool, int, float, str, bytes)
_PLAIN_OR_NODE = PLAIN_TYPES | {dict}
_ARRAY_KEYS = NODE_KEYS["array"]
# Children lists at least this long are first tried as one batch (below).
_BATCH = 8
_tag_of = operator.itemgetter(TAG)
_index_of = operator.itemgetter("i")
_first = operator.itemgetter(0)


def _plain_values_and_arrays(items: list, array_count: int, referenced: set[int]) -> bool:
    """Checks sibling nodes at once if each is a plain value or a valid array node.

    A big record is mostly long runs of these (100,000 arrays in one
    tuple); checked one by one they cost most of opening the archive. Returns
    False, having changed nothing, if any item is anything else or would be
    refused: the caller then walks the items one by one, so a refusal names
    the same node with the same message as ever. When it returns True, the
    one-by-one walk would have accepted every item and recorded the same
    array indices.
    """
    types = set(map(type, items))
    if not types <= _PLAIN_OR_NODE:
        return False
    if dict not in types:
        return True
    nodes = items if len(types) == 1 else [item for item in items if type(item) is dict]
    # Exactly two keys, both present: the keys of an array node and no others.
    if set(map(len, nodes)) != {2}:
        return False
    try:
        tags = list(map(_tag_of, nodes))
        indices = list(map(_index_of, nodes))
    except KeyError:
        return False
    if tags.count("array") != len(tags) or set(map(type, indices)) != {int}:
        return False
    if min(indices) < 0 or max(indices) >= array_count:
        return False
    referenced.update(indices)
    return True


def _check_record_tree(
    root: Any, array_count: int, rules: _NameRules, referenced: set[int]
) -> None:
    """Walks one encoded record iteratively (no recursion: depth is data).

    Nodes are checked in a fixed order (children pushed in written order,
    so popped last first), and the first refused node is the one reported.
    """
    stack: list[tuple[Any, int]] = [(root, 0)]
    pop, push = stack.pop, stack.extend
    nodes = 0
    while stack:
        node, depth = pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise ArchiveError(f"structure is nested more than {MAX_DEPTH} levels deep")
        if nodes > MAX_NODES:
            raise ArchiveError("structure has too many nodes")
        cls = type(node)
        if cls in PLAIN_TYPES:
            continue
        if cls is list:
            kids = node
        elif cls is dict:
            tag = node.get(TAG)
            if tag == "array":  # most nodes of a big record
                if node.keys() != _ARRAY_KEYS:
                    raise _malformed(tag, "unexpected or missing keys")
                referenced.add(_array_index(node, array_count))
                continue
            kids = _check_node(node, tag, array_count, rules, referenced)
        elif node is None or isinstance(node, _LEAF_TYPES):
            continue
        elif isinstance(node, list):
            kids = node
        elif isinstance(node, dict):
            kids = _check_node(node, node.get(TAG), array_count, rules, referenced)
        else:
            raise ArchiveError(f"structure holds an unexpected {type(node).__name__}")
        if not kids:
            continue
        child = depth + 1
        if (
            len(kids) >= _BATCH
            and child <= MAX_DEPTH
            and nodes + len(kids) <= MAX_NODES
            and _plain_values_and_arrays(kids, array_count, referenced)
        ):
            # What popping each of them next would have done, all at once.
            nodes += len(kids)
            continue
        push(zip(kids, itertools.repeat(child)))


def _array_index(node: dict, array_count: int) -> int:
    """An array node's index, refused unless it names one of the archive's arrays."""
    index = node["i"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise _malformed("array", "its index is not an integer")
    if not 0 <= index < array_count:
        raise ArchiveError(f"structure refers to array {index}, which the archive does not hold")
    return index


def _check_node(
    node: dict, tag: Any, array_count: int, rules: _NameRules, referenced: set[int]
) -> list:
    """Checks one tagged node (not its children) and returns its children."""
    keys = NODE_KEYS.get(tag) if isinstance(tag, str) else None
    if keys is None:
        raise ArchiveError(f"structure holds an unknown node kind {brief(tag, 40)}")
    if node.keys() != keys:
        raise _malformed(tag, "unexpected or missing keys")
    if tag in ("tuple", "slice", "complex", "frozenset"):
        items = node["v"]
        if not isinstance(items, list):
            raise _malformed(tag, "its items are not a list")
        if tag == "slice" and len(items) != 3:
            raise _malformed(tag, "it needs start, stop and step")
        if tag == "complex" and (
            len(items) != 2 or not all(type(part) is float for part in items)
        ):
            raise _malformed(tag, "it needs two floats")
    elif tag == "obj":
        rules.type_name(node["type"])
        fields = node["f"]
        if not _name_value_pairs(fields):
            raise _malformed(tag, "its fields are not name-value pairs")
        if len(set(map(_first, fields))) != len(fields):
            raise _malformed(tag, "a field appears twice")
    elif tag in ("dict", "odict"):
        pairs = node["v"]
        if not isinstance(pairs, list) or not _pairs(pairs):
            raise _malformed(tag, "its entries are not key-value pairs")
    elif tag == "int":
        text = node["v"]
        if (
            not isinstance(text, str)
            or not 0 < len(text) <= _MAX_BIG_INT_DIGITS
            or not text.removeprefix("-").isascii()
            or not text.removeprefix("-").isdigit()
        ):
            raise _malformed(tag, "not a decimal integer")
    elif tag == "array":
        referenced.add(_array_index(node, array_count))
    elif tag == "scalar":
        try:
            dtype = dtype_from_name(node["dtype"])
        except ValueError as error:
            raise _malformed(tag, str(error)) from None
        if not isinstance(node["v"], bytes) or len(node["v"]) != dtype.itemsize:
            raise _malformed(tag, "its bytes do not match its dtype")
    elif tag == "enum":
        rules.type_name(node["type"])
        _short_name(node, tag)
    elif tag == "fn":
        rules.callable_name(node["name"])
    elif tag == "partial":
        fn = node["fn"]
        # The decoder accepts only something callable that is not a class.
        if not isinstance(fn, dict) or fn.get(TAG) not in ("fn", "partial"):
            raise _malformed(tag, "it does not wrap a function")
        args, keywords = node["args"], node["kw"]
        if not isinstance(args, list):
            raise _malformed(tag, "its arguments are not a list")
        if not _name_value_pairs(keywords):
            raise _malformed(tag, "its keywords are not name-value pairs")
    elif tag == "initializer":
        if node["factory"] not in INITIALIZER_FACTORIES:
            raise RefusedTypeError(
                f"archive names the initializer factory {brief(node['factory'])}, which is "
                "not on reprokit's allow-list"
            )
        keywords = node["kw"]
        if not _name_value_pairs(keywords, public=True):
            raise _malformed(tag, "its keywords are not name-value pairs")
    elif tag == "type":
        rules.type_name(node["name"])
    elif tag in ("jnp_type", "np_type"):
        _short_name(node, tag)
    elif tag == "dtype":
        try:
            dtype_from_name(node["name"])
        except ValueError as error:
            raise _malformed(tag, str(error)) from None
    elif tag == "builtin_type":
        if node["name"] not in _BUILTIN_TYPE_NAMES:
            raise ArchiveError(
                f"archive names an unknown builtin type {brief(node['name'], 40)}"
            )
    # Checked above, so the grammar's own child list is safe to take.
    return child_nodes(node)


# Distinct descriptors remembered per table; more are checked without being remembered.
_MAX_FORMS = 4096


def _check_descriptors(arrays: list, check_descriptor: Callable[[Any], int]) -> int:
    """Checks every descriptor of the array table, in order; returns their total byte size.

    100,000 arrays share a handful of descriptors (dtype, shape, kind), so a
    descriptor is checked once per distinct form. The form is its msgpack
    encoding with exact types: equal encodings mean equal keys, values and
    value types (True is not 1, a tuple does not encode), hence the same
    verdict. (bytes, bytearray and memoryview encode alike, but the checks
    refuse all three wherever they look, and from msgpack only bytes come.)
    Anything that does not encode is checked without being remembered. A
    refused descriptor is never remembered, so the first refused array is
    named as before.
    """
    forms: dict[bytes, int] = {}
    pack = msgpack.Packer(use_bin_type=True, strict_types=True).pack
    total = 0
    for index, desc in enumerate(arrays):
        try:
            form = pack(desc)
        except (TypeError, ValueError, OverflowError):
            form = None
            pack = msgpack.Packer(use_bin_type=True, strict_types=True).pack
        size = forms.get(form) if form is not None else None
        if size is None:
            try:
                size = check_descriptor(desc)
            except ValueError as error:
                raise ArchiveError(f"array {index}: {error}") from None
            if form is not None and len(forms) < _MAX_FORMS:
                forms[form] = size
        total += size
    return total


def check_structure(
    structure: Any,
    manifest: dict,
    allow: AllowList | None,
    *,
    max_array_bytes: int | None = None,
) -> None:
    """Checks a decoded `structure.msgpack` against its manifest, importing nothing.

    The structure must hold exactly a record and an array table; the record
    exactly the parts its signature implies; the table one valid descriptor
    per array; and every node must be well formed, refer only to arrays the
    table holds, and name only classes and functions the rules admit. With
    `allow` None (for `inspect`), names from the maintainer's own modules
    pass, but nothing any `--allow-module` would be needed for in reprokit's
    own libraries, the standard library, or a denied or private name.
    Every array in the table must be used, so that `run` reads, and thereby
    CRC-checks, each one. With `max_array_bytes`, the arrays together may not
    be larger: filled arrays (all zeros, or one element repeated) have no
    member whose size the container's limits would bound, so a tiny archive
    could otherwise ask for any amount of memory.

    Raises:
        ArchiveError: naming the first problem (`RefusedTypeError` for names).
    """
    from reprokit.archive._descriptors import check_descriptor

    if not isinstance(structure, dict) or set(structure) != {"record", "arrays"}:
        raise ArchiveError("structure.msgpack does not hold a record and an array table")
    record, arrays = structure["record"], structure["arrays"]
    if not isinstance(record, dict):
        raise ArchiveError("structure.msgpack holds an unexpected record")
    parts = set(record)
    expected = set(_ALWAYS)
    if manifest["signature"]["kind"] != "exception":
        expected |= _AFTER_SUCCESS
    if manifest["signature"]["kind"] == "nonfinite_grad":
        expected |= _BACKWARD
    if parts != expected:
        if parts & _AFTER_SUCCESS and not expected & _AFTER_SUCCESS:
            raise ArchiveError("the record's output does not match its signature")
        odd = sorted(map(str, parts ^ expected))[0]
        raise ArchiveError(
            f"structure.msgpack's record has a missing or unexpected part {odd[:40]!r}"
        )
    if not isinstance(arrays, list) or len(arrays) != manifest["arrays"]["count"]:
        raise ArchiveError("the array table does not match the manifest")
    total = _check_descriptors(arrays, check_descriptor)
    if max_array_bytes is not None and total > max_array_bytes:
        raise ArchiveError(
            f"the archive's arrays hold {total} bytes; the limit is {max_array_bytes} "
            "(raise it with --max-total-size only for an archive you trust)"
        )
    declared = manifest["arrays"].get("bytes")
    if declared is not None and declared != total:
        raise ArchiveError("the manifest's array byte count does not match the array table")
    rules = _NameRules(allow)
    referenced: set[int] = set()
    try:
        for name in RECORD_PARTS:
            if name in record:
                _check_record_tree(record[name], len(arrays), rules, referenced)
    except RefusedTypeError:
        raise
    except RecursionError:
        raise ArchiveError("structure is nested too deeply") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        # A safety net: every expected problem has its own message above.
        raise ArchiveError(f"structure is malformed ({type(error).__name__})") from None
    if len(referenced) != len(arrays):
        unused = min(set(range(len(arrays))) - referenced)
        raise ArchiveError(f"array {unused} is in the array table but the record never uses it")
