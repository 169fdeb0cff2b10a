"""Array descriptors: what an archive may say about an array, checked without jax.

Each array is stored as its raw C-order bytes plus a small descriptor (dtype
name, shape, weak type, key implementation, fill, sharding). `verify` and
`inspect` must check descriptors without importing jax, and `replay.py`
must check them exactly as `reprokit run` does. So the checks live here, in
the archive layer, importing only numpy and ml_dtypes, and this file's
source is also embedded verbatim into every standalone `replay.py`.
ml_dtypes is imported only when an archive names one of its dtypes: the
import costs about half a second, more than `inspect` and `verify` of a
float32 archive spend on everything else.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# Only plain numeric dtypes are ever rebuilt; object, string, void and
# datetime dtypes have no place in model data and could smuggle structure.
_NUMERIC_KINDS = frozenset("biufc")
_PRNG_IMPLS = frozenset({"threefry2x32", "rbg", "unsafe_rbg"})
_MAX_RANK = 64
# Sharding descriptors (optional; absent means one device): the mesh, axis
# types and partition spec of a NamedSharding, enough to rebuild it on any
# machine with as many devices. Device ids only order the mesh.
_SHARDING_KEYS = frozenset(
    {"mesh_shape", "axis_names", "axis_types", "spec", "device_count", "device_ids"}
)
_AXIS_TYPES = frozenset({"Auto", "Explicit", "Manual"})
_MAX_DEVICES = 1 << 20
# Arrays of a multi-process capture live in an orbax checkpoint in the archive.
_CHECKPOINT_KEY = re.compile(r"a(0|[1-9][0-9]{0,8})")
# Arrays with no payload member: all zeros, or one element (its bytes in hex)
# repeated, like the all-NaN activations a NaN report is about. Deflate cannot
# shrink those past the reader's zip-bomb ratio; a descriptor costs nothing.
_FILLS = ("zeros", "repeat")
_HEX = re.compile(r"[0-9a-f]*")
# Spread-out elements compared before a full scan for a repeated element.
_FILL_PROBES = 64
_FILL_CHUNK = 1 << 22


# Names already accepted: an archive of 100,000 arrays names a handful of dtypes,
# and building and checking a numpy dtype per array cost more than reading it.
_DTYPES_SEEN: dict[str, np.dtype] = {}


def dtype_from_name(name: str) -> np.dtype:
    """Returns the numeric numpy dtype called `name`, or raises ValueError."""
    if type(name) is str:
        seen = _DTYPES_SEEN.get(name)
        if seen is not None:
            return seen
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid dtype name {name!r}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS or dtype.name != name:
        # Not a numeric numpy dtype by that name: one of ml_dtypes' (bfloat16,
        # float8_*, int4, ...), whose numpy kind is 'V' once registered.
        ml_dtype = _ml_dtype(name)
        if ml_dtype is not None:
            dtype = ml_dtype
        elif dtype is None:
            raise ValueError(f"unknown dtype {name!r}")
        else:
            raise ValueError(f"dtype {name!r} is not a numeric dtype")
    if len(_DTYPES_SEEN) < 256:
        _DTYPES_SEEN[name] = dtype
    return dtype


def _ml_dtype(name: str) -> np.dtype | None:
    """The ml_dtypes scalar type called `name` as a numpy dtype, or None."""
    import ml_dtypes

    if name.startswith("_"):
        return None
    scalar = getattr(ml_dtypes, name, None)
    if isinstance(scalar, type) and issubclass(scalar, np.generic):
        return np.dtype(scalar)
    return None


def check_descriptor(desc: dict) -> int:
    """Validates an array descriptor and returns the byte size it implies."""
    if not isinstance(desc, dict):
        raise ValueError("array descriptor is not a map")
    kind = desc.get("kind")
    if kind not in ("jax", "numpy", "key"):
        raise ValueError(f"unknown array kind {kind!r}")
    dtype = dtype_from_name(desc.get("dtype"))
    shape = desc.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK:
        raise ValueError("array shape is not a list of at most 64 sizes")
    for size in shape:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**62:
            raise ValueError(f"invalid array dimension {size!r}")
    if not isinstance(desc.get("weak_type", False), bool):
        raise ValueError("weak_type is not a boolean")
    fill = desc.get("fill", None)
    if fill is not None and (not isinstance(fill, str) or fill not in _FILLS):
        raise ValueError(f"unknown array fill {fill!r} (written by a newer reprokit?)")
    # isinstance first: `in` on a frozenset hashes, and a list does not hash.
    if kind == "key" and not (
        isinstance(desc.get("key_impl"), str) and desc["key_impl"] in _PRNG_IMPLS
    ):
        raise ValueError(f"unknown PRNG implementation {desc.get('key_impl')!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if desc.get("nbytes") != nbytes:
        raise ValueError("array byte size does not match its dtype and shape")
    if (fill == "repeat") != ("element" in desc):
        raise ValueError('an array has an "element" exactly when its fill is "repeat"')
    element = desc.get("element")
    if "element" in desc and not (
        isinstance(element, str)
        and len(element) == 2 * dtype.itemsize
        and _HEX.fullmatch(element)
    ):
        raise ValueError("the repeated element is not its dtype's bytes in lowercase hex")
    if "sharding" in desc:
        check_sharding(desc["sharding"], len(shape))
    if "checkpoint" in desc:
        key = desc["checkpoint"]
        if not isinstance(key, str) or not _CHECKPOINT_KEY.fullmatch(key):
            raise ValueError("array checkpoint key is malformed")
        if fill is not None:
            raise ValueError("array is both filled and stored in the checkpoint")
    return nbytes


def check_sharding(sharding: Any, rank: int) -> None:
    """Validates a sharding descriptor for an array of `rank` dimensions; raises ValueError."""
    if not isinstance(sharding, dict) or not (
        _SHARDING_KEYS - {"device_ids"} <= sharding.keys() <= _SHARDING_KEYS
    ):
        raise ValueError("array sharding is not a map of the expected fields")
    mesh_shape = sharding["mesh_shape"]
    names, types = sharding["axis_names"], sharding["axis_types"]
    if not isinstance(mesh_shape, list) or not 0 < len(mesh_shape) <= _MAX_RANK:
        raise ValueError("sharding mesh shape is not a list of sizes")
    if not all(type(size) is int and 0 < size <= _MAX_DEVICES for size in mesh_shape):
        raise ValueError("sharding mesh shape holds an invalid size")
    count = sharding["device_count"]
    if type(count) is not int or count != math.prod(mesh_shape) or count > _MAX_DEVICES:
        raise ValueError("sharding device count does not match its mesh shape")
    if (
        not isinstance(names, list)
        or len(names) != len(mesh_shape)
        or not all(
            isinstance(n, str) and n.isascii() and n.isidentifier() and len(n) <= 64 for n in names
        )
        or len(set(names)) != len(names)
    ):
        raise ValueError("sharding axis names are not distinct identifiers, one per mesh axis")
    if (
        not isinstance(types, list)
        or len(types) != len(names)
        or not all(isinstance(t, str) and t in _AXIS_TYPES for t in types)
    ):
        raise ValueError("sharding axis types are not Auto, Explicit or Manual, one per axis")
    spec = sharding["spec"]
    if not isinstance(spec, list) or len(spec) > rank:
        raise ValueError("sharding spec is not a list of at most one entry per dimension")
    used: list[str] = []
    for entry in spec:
        axes = [] if entry is None else [entry] if isinstance(entry, str) else entry
        if not isinstance(axes, list) or not all(isinstance(a, str) and a in names for a in axes):
            raise ValueError("sharding spec names an axis the mesh does not have")
        used += axes
    if len(set(used)) != len(used):
        raise ValueError("sharding spec uses a mesh axis twice")
    ids = sharding.get("device_ids")
    if ids is not None and (
        not isinstance(ids, list)
        or len(ids) != count
        or not all(type(i) is int and 0 <= i < 2**31 for i in ids)
        or len(set(ids)) != count
    ):
        raise ValueError("sharding device ids are not distinct device numbers, one per device")


def aligned_zeros(nbytes: int) -> np.ndarray:
    """A zeroed uint8 buffer whose data is 64-byte aligned."""
    backing = np.zeros(nbytes + 64, dtype=np.uint8)
    start = -backing.ctypes.data % 64
    return backing[start : start + nbytes]


def filled(desc: dict) -> np.ndarray:
    """The aligned uint8 payload of an array stored as a fill ("zeros" or "repeat")."""
    check_descriptor(desc)
    raw = aligned_zeros(desc["nbytes"])
    if desc["fill"] == "repeat" and raw.size:
        element = np.frombuffer(bytes.fromhex(desc["element"]), dtype=np.uint8)
        raw.reshape(-1, element.size)[:] = element
    return raw


def repeated_element(data: np.ndarray) -> bytes | None:
    """The bytes of the one element `data` repeats throughout, or None.

    Compares bits, so an all-NaN array counts (NaN != NaN as numbers). Most
    arrays are rejected by a few spread-out elements before any full scan.
    """
    if data.size == 0 or data.dtype.itemsize == 0:
        return None
    items = np.ascontiguousarray(data).reshape(-1).view(np.uint8).reshape(data.size, -1)
    first = items[0]
    probes = np.linspace(0, len(items) - 1, min(len(items), _FILL_PROBES)).astype(np.int64)
    if not (items[probes] == first).all():
        return None
    rows = max(1, _FILL_CHUNK // items.shape[1])
    for start in range(0, len(items), rows):
        if not (items[start : start + rows] == first).all():
            return None
    return first.tobytes()
