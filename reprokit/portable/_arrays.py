"""Array leaves as raw bytes plus the facts needed to rebuild them exactly.

`np.save` loses bfloat16/float8/int4 dtypes and no public jax API restores a
weak type, so each array is stored as its raw C-order bytes with a small
descriptor (`reprokit.archive._descriptors`, which checks it without jax).
Raw bytes are also the cheapest thing to write and read, and can be read
straight into an aligned buffer that `jax.device_put` aliases.

This module imports only numpy and jax, never the rest of reprokit except
the descriptor checks it is embedded beside: its source is embedded
verbatim into the standalone `replay.py` (imports of reprokit are dropped
there, the names share one namespace), so the script and `reprokit run`
rebuild arrays with the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reprokit.archive._descriptors import (  # noqa: F401 (re-exported for the rest of reprokit)
    aligned_zeros,
    check_descriptor,
    check_sharding,
    dtype_from_name,
    filled,
    repeated_element,
)


def sharding_descriptor(sharding: Any) -> dict | None:
    """The descriptor of a jax sharding over several devices; None for one device or other kinds."""
    import jax

    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.size <= 1:
        return None
    spec = []
    for entry in sharding.spec:
        if entry is None or isinstance(entry, str):
            spec.append(entry)
        elif isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
            spec.append(list(entry))
        else:  # P.UNCONSTRAINED and the like: no concrete layout to record
            return None
    if getattr(sharding.spec, "unreduced", None) or getattr(sharding.spec, "reduced", None):
        return None
    mesh = sharding.mesh
    return {
        "mesh_shape": [int(size) for size in mesh.devices.shape],
        "axis_names": [str(name) for name in mesh.axis_names],
        "axis_types": [t.name for t in mesh.axis_types],
        "spec": spec,
        "device_count": int(mesh.size),
        "device_ids": [int(device.id) for device in mesh.devices.flat],
    }


def named_sharding(sharding: dict, spec: list | None = None, devices: Any = None) -> Any:
    """Rebuilds a recorded sharding on this machine's devices; None if it has too few.

    The recorded device ids order the mesh when all of them exist here,
    otherwise the first devices are used in order. `spec` overrides the
    recorded partition spec (for a key array's data, which has one more axis).
    """
    import jax

    devices = list(jax.devices() if devices is None else devices)
    count = sharding["device_count"]
    if len(devices) < count:
        return None
    by_id = {device.id: device for device in devices}
    ids = sharding.get("device_ids") or []
    chosen = [by_id[i] for i in ids] if ids and all(i in by_id for i in ids) else devices[:count]
    grid = np.empty(len(chosen), dtype=object)
    grid[:] = chosen
    mesh = jax.sharding.Mesh(
        grid.reshape(sharding["mesh_shape"]),
        tuple(sharding["axis_names"]),
        axis_types=tuple(getattr(jax.sharding.AxisType, t) for t in sharding["axis_types"]),
    )
    entries = sharding["spec"] if spec is None else spec
    partition = jax.sharding.PartitionSpec(
        *[tuple(e) if isinstance(e, list) else e for e in entries]
    )
    return jax.sharding.NamedSharding(mesh, partition)


def describe(value: Any) -> tuple[dict, np.ndarray]:
    """Splits an array leaf into a descriptor and a C-ordered numpy view of its bytes."""
    import jax

    if isinstance(value, jax.Array):
        # A key's dtype is jax's extended dtype, never a numpy one: the cheap test first.
        if not isinstance(value.dtype, np.dtype) and jax.dtypes.issubdtype(
            value.dtype, jax.dtypes.prng_key
        ):
            data = np.asarray(jax.random.key_data(value), order="C")
            desc = {"kind": "key", "key_impl": str(jax.random.key_impl(value))}
        else:
            data = np.asarray(value, order="C")
            desc = {"kind": "jax", "weak_type": bool(value.weak_type)}
    else:
        data = np.asarray(value, order="C")
        desc = {"kind": "numpy"}
    desc.update(dtype=_dtype_name(data.dtype), shape=list(data.shape), nbytes=int(data.nbytes))
    sharding = sharding_descriptor(getattr(value, "sharding", None))
    if sharding is not None:
        desc["sharding"] = sharding
    return desc, data


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype: np.dtype) -> str:
    # numpy computes `dtype.name` in Python on every access; a record has few dtypes.
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def rebuild(desc: dict, raw: np.ndarray, sharding: Any = None) -> Any:
    """Rebuilds an array from its descriptor and a uint8 buffer of its bytes.

    The buffer is reinterpreted, not copied; for jax arrays `device_put` can
    alias it when it is 64-byte aligned. `sharding` places a jax array (for
    keys: their data) on several devices; None puts it on the default device.
    """
    import jax

    nbytes = check_descriptor(desc)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != nbytes:
        raise ValueError("array payload size does not match its descriptor")
    data = raw.view(dtype_from_name(desc["dtype"])).reshape(desc["shape"])
    if desc["kind"] == "numpy":
        return data
    if desc["kind"] == "key":
        return jax.random.wrap_key_data(jax.device_put(data, sharding), impl=desc["key_impl"])
    array = jax.device_put(data, sharding)
    if desc.get("weak_type"):
        array = _as_weak_type(array)
    return array


def _as_weak_type(array: Any) -> Any:
    # Weak types decide dtype promotion (a bf16 layer fed a weak float32
    # scalar stays bf16), and jax has no public API to set one.
    from jax._src.lax.lax import _convert_element_type

    return _convert_element_type(array, array.dtype, weak_type=True)
