"""Array leaves as raw bytes plus the facts needed to rebuild them exactly.

`np.save` loses bfloat16/float8/int4 dtypes and no public jax API restores a
weak type, so each array is stored as its raw C-order bytes with a small
descriptor: dtype name, shape, weak type, and for typed PRNG keys the key
implementation. Raw bytes are also the cheapest thing to write and read, and
can be read straight into an aligned buffer that `jax.device_put` aliases.

This module imports only numpy, ml_dtypes and jax, never the rest of
reprokit: its source is embedded verbatim into the standalone `replay.py`, so
the script and `reprokit run` rebuild arrays with the same code.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

# Only plain numeric dtypes are ever rebuilt; object, string, void and
# datetime dtypes have no place in model data and could smuggle structure.
_NUMERIC_KINDS = frozenset("biufc")
_ML_DTYPE_NAMES = frozenset(
    name
    for name in dir(ml_dtypes)
    if not name.startswith("_") and isinstance(getattr(ml_dtypes, name), type)
    if issubclass(getattr(ml_dtypes, name), np.generic)
)
_PRNG_IMPLS = frozenset({"threefry2x32", "rbg", "unsafe_rbg"})
_MAX_RANK = 64


def dtype_from_name(name: str) -> np.dtype:
    """Returns the numeric numpy dtype called `name`, or raises ValueError."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid dtype name {name!r}")
    if name in _ML_DTYPE_NAMES:
        dtype = np.dtype(getattr(ml_dtypes, name))
    else:
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise ValueError(f"unknown dtype {name!r}") from None
        if dtype.kind not in _NUMERIC_KINDS or dtype.name != name:
            raise ValueError(f"dtype {name!r} is not a numeric dtype")
    return dtype


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
    if desc.get("fill", None) not in (None, "zeros"):
        raise ValueError(f"unknown array fill {desc.get('fill')!r}")
    if kind == "key" and desc.get("key_impl") not in _PRNG_IMPLS:
        raise ValueError(f"unknown PRNG implementation {desc.get('key_impl')!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if desc.get("nbytes") != nbytes:
        raise ValueError("array byte size does not match its dtype and shape")
    return nbytes


def describe(value: Any) -> tuple[dict, np.ndarray]:
    """Splits an array leaf into a descriptor and a C-ordered numpy view of its bytes."""
    import jax

    if isinstance(value, jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(value), order="C")
            desc = {"kind": "key", "key_impl": str(jax.random.key_impl(value))}
        else:
            data = np.asarray(value, order="C")
            desc = {"kind": "jax", "weak_type": bool(value.weak_type)}
    else:
        data = np.asarray(value, order="C")
        desc = {"kind": "numpy"}
    desc.update(dtype=data.dtype.name, shape=list(data.shape), nbytes=int(data.nbytes))
    return desc, data


def aligned_zeros(nbytes: int) -> np.ndarray:
    """A zeroed uint8 buffer whose data is 64-byte aligned (for arrays stored as "fill": "zeros")."""
    backing = np.zeros(nbytes + 64, dtype=np.uint8)
    start = -backing.ctypes.data % 64
    return backing[start : start + nbytes]


def rebuild(desc: dict, raw: np.ndarray) -> Any:
    """Rebuilds an array from its descriptor and a uint8 buffer of its bytes.

    The buffer is reinterpreted, not copied; for jax arrays `device_put` can
    alias it when it is 64-byte aligned.
    """
    import jax

    nbytes = check_descriptor(desc)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != nbytes:
        raise ValueError("array payload size does not match its descriptor")
    data = raw.view(dtype_from_name(desc["dtype"])).reshape(desc["shape"])
    if desc["kind"] == "numpy":
        return data
    if desc["kind"] == "key":
        return jax.random.wrap_key_data(jax.device_put(data), impl=desc["key_impl"])
    array = jax.device_put(data)
    if desc.get("weak_type"):
        array = _as_weak_type(array)
    return array


def _as_weak_type(array: Any) -> Any:
    # Weak types decide dtype promotion (a bf16 layer fed a weak float32
    # scalar stays bf16), and jax has no public API to set one.
    from jax._src.lax.lax import _convert_element_type

    return _convert_element_type(array, array.dtype, weak_type=True)
