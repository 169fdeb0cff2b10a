"""Encoding of pytree structure as plain msgpack data, and its safe decoding.

A captured record (submodel, inputs, outputs, variable values) is a tree of
penzai Structs, dataclasses, containers, static metadata and array leaves.
It is written as a tree of msgpack values in which every non-plain node is a
small map tagged by `"$t"` (tuple, dict, object, enum, function, ...), and
every array is replaced by an index into a separate table of array
descriptors whose bytes live in their own archive members.

Decoding is the security boundary: it rebuilds classes and references
callables only through `reprokit.archive._allowlist.AllowList`, never runs a
constructor's `__init__`, and bounds depth, string lengths and node counts.
Nothing in the archive can choose which code runs.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from reprokit._errors import ArchiveError, CaptureError, RefusedTypeError
from reprokit.archive import _allowlist
from reprokit.archive._grammar import (  # noqa: F401 (re-exported: the grammar's home is the archive layer)
    MAX_DEPTH,
    MAX_NODES,
    MAX_STRING,
    PLAIN_TYPES,
    TAG,
    pack_bytes,
    unpack_bytes,
)
from reprokit.record import _flax, _names

# ------------------------------------------------------------------ encoding


class _Encoder:
    """Encodes one tree; `names` collects every class and function name it writes.

    How a value is encoded depends only on its type (the one exception, an
    int's range, is checked per value), so the choice is made once per type
    and kept in `_handlers`: a record of 10,000 NamedArrays holds three types.
    Paths (`where`) are built only when an error needs one: a node's path is
    its parent's path and one step, kept as a tuple until it is printed.
    """

    def __init__(
        self,
        on_array: Callable[[Any], int],
        extra_modules: tuple[str, ...],
        aliases: dict[str, str] | None = None,
    ):
        self._on_array = on_array
        self._extra_modules = extra_modules
        self._aliases = aliases or {}
        self._jax = __import__("jax")
        self.names: set[str] = set()
        self._handlers: dict[type, Callable[[Any, Any, int], Any]] = {}
        self._plans: dict[type, tuple[str, tuple[str, ...], bool]] = {}

    def encode(self, value: Any, where: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise CaptureError(f"{_path(where)} is nested more than {MAX_DEPTH} levels deep")
        handler = self._handlers.get(type(value))
        if handler is None:
            handler = self._handlers[type(value)] = self._handler_for(value)
        return handler(value, where, depth)

    def _handler_for(self, value: Any) -> Callable[[Any, Any, int], Any]:
        """How values of exactly `value`'s type are encoded (the checks run in this order)."""
        jax, cls = self._jax, type(value)
        if cls is type(None) or issubclass(cls, (bool, str, bytes)) or cls is float:
            return _encode_as_is
        if cls is int:
            return _encode_int
        if issubclass(cls, jax.core.Tracer):
            return _encode_tracer
        if issubclass(cls, (jax.Array, np.ndarray)):
            return self._array
        if issubclass(cls, np.generic):
            return _encode_scalar
        if cls is list:
            return self._list
        if cls is tuple:
            return self._tuple
        if cls is dict or cls is collections.OrderedDict:
            return self._dict
        if issubclass(cls, enum.Enum):
            return self._enum
        if issubclass(cls, type):
            return lambda value, where, depth: self._encode_type(value, where)
        if issubclass(cls, np.dtype):
            return _encode_dtype
        if cls is frozenset:
            return self._frozenset
        if dataclasses.is_dataclass(value):
            return self._dataclass
        if issubclass(cls, functools.partial):
            return self._partial
        if cls is slice:
            return self._slice
        if cls is complex:
            return _encode_complex
        if callable(value):  # for an instance, a property of its type
            return self._callable
        return _encode_unsaveable

    def _array(self, value: Any, where: Any, depth: int) -> dict:
        return {TAG: "array", "i": self._on_array(value)}

    def _list(self, value: list, where: Any, depth: int) -> list:
        encode, depth = self.encode, depth + 1
        return [encode(v, (where, "[{}]", i), depth) for i, v in enumerate(value)]

    def _tuple(self, value: tuple, where: Any, depth: int) -> dict:
        return {TAG: "tuple", "v": self._list(value, where, depth)}

    def _dict(self, value: dict, where: Any, depth: int) -> dict:
        encode, depth = self.encode, depth + 1
        items = [
            [encode(k, (where, " key", None), depth), encode(v, (where, "[{!r}]", k), depth)]
            for k, v in value.items()
        ]
        return {TAG: "dict" if type(value) is dict else "odict", "v": items}

    def _enum(self, value: enum.Enum, where: Any, depth: int) -> dict:
        return {TAG: "enum", "type": self._class_name(type(value), where), "name": value.name}

    def _frozenset(self, value: frozenset, where: Any, depth: int) -> dict:
        items = [self.encode(v, (where, " item", None), depth + 1) for v in value]
        # Set order follows string hashing, which changes between runs:
        # sort the encoded items so that one model always writes one archive.
        items.sort(key=pack_bytes)
        return {TAG: "frozenset", "v": items}

    def _dataclass(self, value: Any, where: Any, depth: int) -> dict:
        plan = self._plans.get(type(value))
        if plan is None:
            cls = type(value)
            plan = self._plans[cls] = (
                self._class_name(cls, where),
                tuple(f.name for f in dataclasses.fields(cls)),
                _flax.is_flax_module_class(cls),
            )
        name, fields, is_flax = plan
        if is_flax:
            _flax.check_capture(value, _path(where))
        encode, depth = self.encode, depth + 1
        return {
            TAG: "obj",
            "type": name,
            "f": [[f, encode(getattr(value, f), (where, ".{}", f), depth)] for f in fields],
        }

    def _partial(self, value: functools.partial, where: Any, depth: int) -> dict:
        encode, depth = self.encode, depth + 1
        return {
            TAG: "partial",
            "fn": encode(value.func, (where, ".func", None), depth),
            "args": [encode(a, (where, ".args", None), depth) for a in value.args],
            "kw": [[k, encode(v, (where, ".{}", k), depth)] for k, v in value.keywords.items()],
        }

    def _slice(self, value: slice, where: Any, depth: int) -> dict:
        parts = (value.start, value.stop, value.step)
        return {TAG: "slice", "v": [self.encode(v, where, depth + 1) for v in parts]}

    def _callable(self, value: Any, where: Any, depth: int) -> dict:
        made = _flax.initializer_call(value)
        if made is not None:
            factory, keywords = made
            self.names.add(factory)
            return {
                TAG: "initializer",
                "factory": factory,
                "kw": [
                    [k, self.encode(v, (where, ".{}", k), depth + 1)] for k, v in keywords.items()
                ],
            }
        name = _names.name_of_callable(value, _path(where), self._extra_modules, self._aliases)
        self.names.add(name)
        return {TAG: "fn", "name": name}

    def _class_name(self, cls: type, where: Any) -> str:
        name = _names.name_of_type(cls, _path(where), self._aliases)
        self.names.add(name)
        return name

    def _encode_type(self, cls: type, where: Any) -> dict:
        jnp = self._jax.numpy
        if isinstance(cls, type(jnp.float32)) and getattr(jnp, cls.__name__, None) is cls:
            return {TAG: "jnp_type", "name": cls.__name__}
        if issubclass(cls, np.generic):
            if getattr(np, cls.__name__, None) is cls:
                return {TAG: "np_type", "name": cls.__name__}
            if getattr(ml_dtypes, cls.__name__, None) is cls:
                return {TAG: "np_type", "name": cls.__name__}
        if cls in _BUILTIN_TYPES.values():
            return {TAG: "builtin_type", "name": cls.__name__}
        return {TAG: "type", "name": self._class_name(cls, where)}


def _path(where: Any) -> str:
    """The printable path of a lazily built `where` (a string, or (parent, step format, value))."""
    steps = []
    while type(where) is tuple:
        where, form, value = where
        steps.append(form.format(value))
    return str(where) + "".join(reversed(steps))


def _encode_as_is(value: Any, where: Any, depth: int) -> Any:
    return value


def _encode_int(value: int, where: Any, depth: int) -> Any:
    return value if -(2**63) <= value < 2**64 else {TAG: "int", "v": str(value)}


def _encode_tracer(value: Any, where: Any, depth: int) -> Any:
    raise CaptureError(_TRACER_MESSAGE.format(where=_path(where)))


def _encode_scalar(value: np.generic, where: Any, depth: int) -> dict:
    _arrays_check(value.dtype, where)
    return {TAG: "scalar", "dtype": value.dtype.name, "v": value.tobytes()}


def _encode_dtype(value: np.dtype, where: Any, depth: int) -> dict:
    _arrays_check(value, where)
    return {TAG: "dtype", "name": value.name}


def _encode_complex(value: complex, where: Any, depth: int) -> dict:
    return {TAG: "complex", "v": [value.real, value.imag]}


def _encode_unsaveable(value: Any, where: Any, depth: int) -> Any:
    raise CaptureError(
        f"{_path(where)} holds a {type(value).__module__}.{type(value).__qualname__}, which "
        "reprokit cannot save; use arrays, numbers, strings, containers, penzai Structs or "
        "dataclasses"
    )


def _arrays_check(dtype: np.dtype, where: Any) -> None:
    if dtype.kind not in "biufc" and dtype.name not in _allowlist_dtype_names():
        raise CaptureError(f"{_path(where)} has dtype {dtype}, which reprokit cannot save")


@functools.cache
def _allowlist_dtype_names() -> frozenset[str]:
    return frozenset(
        name
        for name in dir(ml_dtypes)
        if isinstance(getattr(ml_dtypes, name), type)
        and issubclass(getattr(ml_dtypes, name), np.generic)
    )


_TRACER_MESSAGE = (
    "{where} is a traced value: reprokit.pack was called inside jax.jit/vmap/grad (or the "
    "capture saw tracers). Call pack outside any transformation, with concrete arrays, and pass "
    "mode='jit' to record the layer's behaviour under jit"
)

_BUILTIN_TYPES = {t.__name__: t for t in (int, float, bool, str, complex, bytes, type(None))}


def encode_tree(
    value: Any,
    on_array: Callable[[Any], int],
    *,
    where: str = "record",
    extra_modules: tuple[str, ...] = (),
    module_aliases: dict[str, str] | None = None,
    names_out: set[str] | None = None,
) -> Any:
    """Encodes `value` into msgpack-ready data; `on_array(array)` returns each array's index.

    `module_aliases` renames the modules classes and functions are named by
    (a script's `__main__` becomes its bundled module with `--bundle-code`).
    `names_out` receives every class and function name written (what
    `reprokit.archive._grammar.named` finds in the result), so that callers
    need not walk the encoded tree again to learn them.
    """
    encoder = _Encoder(on_array, extra_modules, module_aliases)
    encoded = encoder.encode(value, where)
    if names_out is not None:
        names_out.update(encoder.names)
    return encoded


# ------------------------------------------------------------------ decoding


class Decoder:
    """Rebuilds encoded data under an allow-list; `array(i)` supplies array leaves."""

    def __init__(self, allow: _allowlist.AllowList, array: Callable[[int], Any]):
        self._allow = allow
        self._array = array
        self._nodes = 0
        # Names resolved once per decoding: a record of 10,000 NamedArrays names
        # the same few classes 10,000 times, and resolving imports and checks.
        self._types: dict[str, Any] = {}
        self._callables: dict[str, Any] = {}
        self._plans: dict[str, tuple[Any, list[str], str]] = {}

    def resolve_type(self, name: Any) -> Any:
        """`_names.resolve_type` under this decoder's allow-list, once per name."""
        if type(name) is not str:
            return _names.resolve_type(self._allow, name)
        cls = self._types.get(name)
        if cls is None:
            cls = self._types[name] = _names.resolve_type(self._allow, name)
        return cls

    def resolve_callable(self, name: Any) -> Any:
        """`_names.resolve_callable` under this decoder's allow-list, once per name."""
        if type(name) is not str:
            return _names.resolve_callable(self._allow, name)
        fn = self._callables.get(name)
        if fn is None:
            fn = self._callables[name] = _names.resolve_callable(self._allow, name)
        return fn

    def decode(self, node: Any, depth: int = 0) -> Any:
        self._nodes += 1
        if depth > MAX_DEPTH:
            raise ArchiveError(f"structure is nested more than {MAX_DEPTH} levels deep")
        if self._nodes > MAX_NODES:
            raise ArchiveError("structure has too many nodes")
        kind = type(node)
        # Exact types first: msgpack returns exactly these, and most nodes are one.
        if kind in PLAIN_TYPES:
            return node
        if kind is not dict:
            if node is None or isinstance(node, (bool, int, float, str, bytes)):
                return node
            if isinstance(node, list):
                return [self.decode(v, depth + 1) for v in node]
            if not isinstance(node, dict):
                raise ArchiveError(f"structure holds an unexpected {type(node).__name__}")
        tag = node.get(TAG)
        handler = _HANDLERS.get(tag) if isinstance(tag, str) else None
        if handler is None:
            raise ArchiveError(f"structure holds an unknown node kind {_allowlist.brief(tag, 40)}")
        try:
            return handler(self, node, depth + 1)
        except (ArchiveError, RecursionError):
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ArchiveError(f"structure has a malformed {tag!r} node ({error})") from None

    def _list(self, node: dict, key: str, depth: int) -> list:
        items = node[key]
        if not isinstance(items, list):
            raise ArchiveError(f"structure has a malformed {node[TAG]!r} node")
        return [self.decode(v, depth) for v in items]

    def _pairs(self, node: dict, depth: int) -> list[tuple[Any, Any]]:
        pairs = []
        decode = self.decode
        for item in node["v"]:
            if type(item) is not list or len(item) != 2:
                raise ArchiveError("structure has a malformed dict entry")
            key = decode(item[0], depth)
            if type(key) is not str:
                try:
                    hash(key)  # keys are plain values or frozen allow-listed dataclasses
                except TypeError:
                    raise ArchiveError("structure has a dict key that is not hashable") from None
            pairs.append((key, decode(item[1], depth)))
        return pairs

    def _plan(self, name: Any) -> tuple[Any, list[str], str]:
        """(class, its field names, how to build it) for an `obj` node's type, once per name."""
        plan = self._plans.get(name) if type(name) is str else None
        if plan is not None:
            return plan
        cls = self.resolve_type(name)
        if not dataclasses.is_dataclass(cls):
            raise RefusedTypeError(f"{name!r} is not a dataclass")
        build = "flax" if _flax.is_flax_module_class(cls) else "fields"
        plan = (cls, [f.name for f in dataclasses.fields(cls)], build)
        if type(name) is str:
            self._plans[name] = plan
        return plan

    def _obj(self, node: dict, depth: int) -> Any:
        cls, expected, build = self._plan(node["type"])
        given = node["f"]
        if type(given) is not list or len(given) != len(expected):
            raise ArchiveError(f"fields of {node['type']!r} in the archive do not match the class")
        values = {}
        decode = self.decode
        for field, name in zip(given, expected, strict=True):
            if type(field) is not list or len(field) != 2 or field[0] != name:
                raise ArchiveError(
                    f"fields of {node['type']!r} in the archive do not match the class"
                )
            values[name] = decode(field[1], depth)
        if build == "flax":
            return _flax.rebuild_module(cls, values)
        # Never run __init__/__post_init__: build the instance field by field.
        # (What penzai's `Struct.from_attributes` does once it has checked the
        # field names, which the loop above has just done.)
        instance = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(instance, name, value)
        return instance

    def _enum(self, node: dict, depth: int) -> Any:
        cls = self.resolve_type(node["type"])
        if not issubclass(cls, enum.Enum) or node["name"] not in cls.__members__:
            raise ArchiveError(f"archive names an unknown enum member of {node['type']!r}")
        return cls[node["name"]]

    def _scalar(self, node: dict, depth: int) -> Any:
        from reprokit.portable._arrays import dtype_from_name

        dtype = dtype_from_name(node["dtype"])
        raw = node["v"]
        if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
            raise ArchiveError("structure holds a malformed numpy scalar")
        return np.frombuffer(raw, dtype=dtype)[0]


def _jnp_type(decoder: Decoder, node: dict, depth: int) -> Any:
    import jax.numpy as jnp

    name = node["name"]
    value = getattr(jnp, name, None) if isinstance(name, str) and name.isidentifier() else None
    if value is None or not isinstance(value, type(jnp.float32)):
        raise ArchiveError(f"archive names an unknown jax.numpy type {_allowlist.brief(name, 40)}")
    return value


def _np_type(decoder: Decoder, node: dict, depth: int) -> Any:
    name = node["name"]
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ArchiveError("archive names a malformed numpy type")
    for module in (np, ml_dtypes):
        value = getattr(module, name, None)
        if isinstance(value, type) and issubclass(value, np.generic):
            if value.__name__ == name:
                return value
    raise ArchiveError(f"archive names an unknown numpy type {name[:40]!r}")


def _dtype(decoder: Decoder, node: dict, depth: int) -> Any:
    from reprokit.portable._arrays import dtype_from_name

    return dtype_from_name(node["name"])


def _big_int(decoder: Decoder, node: dict, depth: int) -> int:
    text = node["v"]
    if not isinstance(text, str) or len(text) > 4000 or not text.lstrip("-").isdigit():
        raise ArchiveError("structure holds a malformed integer")
    return int(text)


def _slice(decoder: Decoder, node: dict, depth: int) -> slice:
    parts = decoder._list(node, "v", depth)
    if len(parts) != 3 or not all(p is None or isinstance(p, int) for p in parts):
        raise ArchiveError("structure holds a malformed slice")
    return slice(*parts)


def _complex(decoder: Decoder, node: dict, depth: int) -> complex:
    real, imag = node["v"]
    if not isinstance(real, float) or not isinstance(imag, float):
        raise ArchiveError("structure holds a malformed complex number")
    return complex(real, imag)


def _partial(decoder: Decoder, node: dict, depth: int) -> functools.partial:
    fn = decoder.decode(node["fn"], depth)
    if not callable(fn) or isinstance(fn, type):
        raise ArchiveError("structure holds a partial of something that is not a function")
    keywords = {}
    for item in node["kw"]:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise ArchiveError("structure holds a malformed partial")
        keywords[item[0]] = decoder.decode(item[1], depth)
    return functools.partial(fn, *decoder._list(node, "args", depth), **keywords)


def _array(decoder: Decoder, node: dict, depth: int) -> Any:
    index = node["i"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise ArchiveError("structure holds a malformed array reference")
    return decoder._array(index)


def _builtin_type(decoder: Decoder, node: dict, depth: int) -> type:
    cls = _BUILTIN_TYPES.get(node["name"])
    if cls is None:
        raise ArchiveError(
            f"archive names an unknown builtin type {_allowlist.brief(node['name'], 40)}"
        )
    return cls


def _frozenset(decoder: Decoder, node: dict, depth: int) -> frozenset:
    items = decoder._list(node, "v", depth)
    try:
        return frozenset(items)
    except TypeError:
        raise ArchiveError("structure has a frozenset item that is not hashable") from None


def _initializer(decoder: Decoder, node: dict, depth: int) -> Any:
    keywords = {}
    for item in node["kw"]:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise ArchiveError("structure holds a malformed initializer")
        keywords[item[0]] = decoder.decode(item[1], depth)
    return _flax.make_initializer(node["factory"], keywords)


_HANDLERS: dict[str, Callable[[Decoder, dict, int], Any]] = {
    "tuple": lambda d, n, depth: tuple(d._list(n, "v", depth)),
    "dict": lambda d, n, depth: dict(d._pairs(n, depth)),
    "odict": lambda d, n, depth: collections.OrderedDict(d._pairs(n, depth)),
    "int": _big_int,
    "array": _array,
    "scalar": lambda d, n, depth: d._scalar(n, depth),
    "obj": lambda d, n, depth: d._obj(n, depth),
    "enum": lambda d, n, depth: d._enum(n, depth),
    "fn": lambda d, n, depth: d.resolve_callable(n["name"]),
    "partial": _partial,
    "type": lambda d, n, depth: d.resolve_type(n["name"]),
    "jnp_type": _jnp_type,
    "np_type": _np_type,
    "dtype": _dtype,
    "builtin_type": _builtin_type,
    "slice": _slice,
    "complex": _complex,
    "frozenset": _frozenset,
    "initializer": _initializer,
}


def decode_tree(node: Any, allow: _allowlist.AllowList, array: Callable[[int], Any]) -> Any:
    """Rebuilds a tree encoded by `encode_tree`, resolving names only through `allow`."""
    try:
        return Decoder(allow, array).decode(node)
    except RecursionError:
        raise ArchiveError("structure is nested too deeply") from None
