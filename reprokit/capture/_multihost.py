"""Multi-process (multi-host) capture: every process writes its shards, process 0 writes the archive.

On a TPU pod or a multi-node GPU job, `jax.process_count() > 1` and a
sharded parameter is not fully addressable: no process holds all of it, so
`np.asarray` fails and no single process can write the archive alone.
`reprokit.pack` called on every process (as the model itself is) then:

1. captures the selected layer on every process (the model run is SPMD);
2. decides the recorded issue without gathering: NaN/Inf counts are
   reduced on the devices, and only those counts reach the host;
3. saves exactly the selected layer's arrays that are not fully
   addressable with orbax-checkpoint's `StandardCheckpointer` into a
   scratch folder all processes can reach (`shards_dir`, by default next
   to the archive): every process writes its own shards, in parallel;
4. waits at a barrier; process 0 then writes the single archive, with the
   checkpoint's OCDBT folder stored under `checkpoint/` and each such
   array's descriptor naming its checkpoint key; other processes wait at a
   second barrier until the archive exists.

Replay never needs more than one process: tensorstore reads each array
straight out of the zip (zarr -> ocdbt -> zip -> file), after the members'
CRCs are checked, and `reprokit.replaying._sharding` places it on whatever topology
the maintainer has. `gather=True` (`--gather`) instead gathers every such
array to all processes with `multihost_utils.process_allgather` and stores
it as an ordinary member: simpler archives and no shared folder, but every
process briefly holds the full arrays, so it only suits small layers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any

import numpy as np

from reprokit._errors import UsageError
from reprokit.archive._checkpoint import CHECKPOINT_PREFIX, SECTION
from reprokit.capture._options import PackOptions

# Process 0 may take a while after the shards are written (the archive,
# its self-check replay); the other processes wait this long for it.
ARCHIVE_BARRIER_TIMEOUT_S = 1800
_barriers = 0


# ------------------------------------------------------------------ pack side


def _barrier(name: str, timeout_s: float) -> None:
    """Waits until every process reaches `name` (jax's distributed client, with a timeout)."""
    import orbax.checkpoint as ocp

    global _barriers
    _barriers += 1  # every process counts the same barriers, so keys stay unique and equal
    ocp.multihost.get_barrier_sync_fn()(
        key=f"reprokit_{name}_{_barriers}", timeout_ms=int(timeout_s * 1000)
    )


def _is_local(value: Any) -> bool:
    import jax

    return not isinstance(value, jax.Array) or value.is_fully_addressable


def nonfinite_on_devices(leaf: Any) -> dict[str, int]:
    """NaN/+Inf/-Inf counts of an array, reduced where it lives (no gather of the values)."""
    import jax
    import jax.numpy as jnp

    from reprokit.portable._verdict import leaf_as_numpy, nonfinite_counts

    if _is_local(leaf):
        return nonfinite_counts(leaf_as_numpy(leaf))
    if not jnp.issubdtype(leaf.dtype, jnp.inexact) or leaf.size == 0:
        return {"nan": 0, "posinf": 0, "neginf": 0}
    replicated = None
    if isinstance(leaf.sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    counts = jax.jit(
        lambda x: (jnp.isnan(x).sum(), jnp.isposinf(x).sum(), jnp.isneginf(x).sum()),
        out_shardings=replicated,
    )(leaf)
    return dict(zip(("nan", "posinf", "neginf"), (int(np.asarray(c)) for c in counts), strict=True))


def _output_counts(record: Any) -> list[tuple[str, dict[str, int]]]:
    import jax

    if record.exception is not None:
        return []
    flat, _ = jax.tree_util.tree_flatten_with_path(record.output)
    return [("output" + jax.tree_util.keystr(p), nonfinite_on_devices(leaf)) for p, leaf in flat]


def choose_call(capture: Any, call: int | None) -> tuple[Any, list]:
    """As `_capture.choose_call`, judging NaN/Inf on the devices; returns (record, output counts)."""
    from reprokit.capture._capture import choose_call as choose_local

    if call is not None:
        record = choose_local(capture, call)
        return record, _output_counts(record)
    for record in capture.calls:
        counts = _output_counts(record)
        if record.exception is not None or any(any(c.values()) for _, c in counts):
            return record, counts
    return capture.calls[0], _output_counts(capture.calls[0])


def signature_of(record: Any, counts: list, kind: str | None) -> dict:
    """The recorded issue, as `_verdict.detect_signature` decides it, from device-side counts."""
    from reprokit.portable._verdict import detect_signature

    try:
        if record.exception is not None:
            return detect_signature({"exception": record.exception, "output": []}, kind)
        nonfinite = [{"path": path, **c} for path, c in counts if any(c.values())]
        if nonfinite and kind in (None, "nonfinite"):
            return {"kind": "nonfinite", "leaves": nonfinite}
        return detect_signature({"exception": None, "output": []}, kind)
    except ValueError as error:
        raise UsageError(str(error)) from None


def describe_global(value: Any) -> tuple[dict, Any]:
    """A descriptor for an array no process holds whole, and the jax array of its data."""
    import jax

    from reprokit.portable._arrays import sharding_descriptor

    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(value)
        desc: dict = {"kind": "key", "key_impl": str(jax.random.key_impl(value))}
    else:
        data = value
        desc = {"kind": "jax", "weak_type": bool(value.weak_type)}
    dtype = np.dtype(data.dtype)
    desc.update(
        dtype=dtype.name,
        shape=[int(s) for s in data.shape],
        nbytes=int(math.prod(data.shape)) * dtype.itemsize,
    )
    sharding = sharding_descriptor(value.sharding)
    if sharding is not None:
        desc["sharding"] = sharding
    return desc, data


def _unique_arrays(record: Any, allow: tuple[str, ...], aliases: dict | None) -> list:
    """The record's arrays in encoding order, each once (the same on every process)."""
    from reprokit.capture._write import _record_parts
    from reprokit.record import _encoding

    seen: dict[int, Any] = {}

    def on_array(value: Any) -> int:
        seen.setdefault(id(value), value)
        return 0

    for name, part in _record_parts(record).items():
        _encoding.encode_tree(
            part, on_array, where=name, extra_modules=allow, module_aliases=aliases
        )
    return list(seen.values())


def _save_checkpoint(arrays: dict[str, Any], directory: str) -> None:
    """Every process writes its shards of `arrays` with orbax (a collective call)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(directory, arrays, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def _zarr_driver(directory: str) -> str:
    try:
        with open(os.path.join(directory, "_METADATA"), encoding="utf-8") as file:
            return "zarr3" if json.load(file).get("use_zarr3") else "zarr"
    except (OSError, ValueError):
        return "zarr"


def _checkpoint_members(directory: str) -> list[tuple[str, bytes]]:
    members = []
    for root, folders, files in os.walk(directory):
        folders.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            with open(path, "rb") as file:
                members.append((CHECKPOINT_PREFIX + relative, file.read()))
    return members


def pack_multiprocess(
    selection: Any,
    argument: Any,
    *,
    side_inputs: dict,
    out: str,
    options: PackOptions,
) -> Any:
    """`reprokit.pack` when `jax.process_count() > 1`: call it on every process, as the model is.

    `options` are the caller's `PackOptions` (redact, max_size and compress
    are refused before this). Returns the `PackResult` on every process;
    only process 0 writes the archive (other processes report size 0 and no
    self-check).
    """
    import jax
    from jax.experimental import multihost_utils

    from reprokit.capture._capture import capture_calls
    from reprokit.capture._write import PackResult, write_archive
    from reprokit.portable._arrays import describe
    from reprokit.record import _bundle

    out = os.path.abspath(os.fspath(out))
    started = time.perf_counter()
    capture = capture_calls(selection, argument, dict(side_inputs or {}), options.mode)
    record, counts = choose_call(capture, options.call)
    sig = signature_of(record, counts, options.signature)
    aliases = _bundle.main_aliases() if options.bundle_code else None
    described: dict[int, tuple[dict, Any]] = {}
    to_save: dict[str, Any] = {}
    for index, value in enumerate(_unique_arrays(record, options.allow_modules, aliases)):
        if _is_local(value):
            continue
        desc, data = describe_global(value)
        if options.gather:
            # Collective: every process takes part, and every process gets the whole array.
            host = np.asarray(multihost_utils.process_allgather(data, tiled=True), order="C")
            described[id(value)] = (desc, host)
        else:
            desc["checkpoint"] = key = f"a{index}"
            to_save[key] = data
            described[id(value)] = (desc, None)
    captured = time.perf_counter()
    # Always a folder of our own inside `shards_dir`: orbax replaces what is at its path.
    directory = os.path.join(
        os.path.abspath(options.shards_dir or os.path.dirname(out)), os.path.basename(out) + ".shards"
    )
    if to_save:
        _save_checkpoint(to_save, directory)
    _barrier("shards_written", ARCHIVE_BARRIER_TIMEOUT_S)
    stored = time.perf_counter()
    storage = "checkpoint" if to_save else "gather" if described else "local"
    section: dict[str, Any] = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "storage": storage,
        "global_arrays": len(described),
        "timings_s": {
            "capture": round(captured - started, 3),
            "store": round(stored - captured, 3),
        },
    }
    if jax.process_index() != 0:
        _barrier("archive_written", ARCHIVE_BARRIER_TIMEOUT_S)
        return PackResult(
            path=out,
            signature=sig,
            keypath=capture.keypath,
            layer_type=capture.layer_type,
            call_index=record.index,
            call_count=len(capture.calls),
            mode=capture.mode,
            array_count=0,
            array_bytes=0,
            size=0,
        )
    try:
        members: list[tuple[str, bytes]] = []
        if to_save:
            members = _checkpoint_members(directory)
            section["checkpoint"] = {
                "format": "orbax-checkpoint OCDBT",
                "driver": _zarr_driver(directory),
                "arrays": len(to_save),
                "members": len(members),
            }

        def describe_array(value: Any) -> tuple[dict, Any]:
            found = described.get(id(value))
            return (dict(found[0]), found[1]) if found is not None else describe(value)

        result = write_archive(
            record,
            out=out,
            keypath=capture.keypath,
            layer_type=capture.layer_type,
            mode=capture.mode,
            call_count=len(capture.calls),
            options=options,
            signature_info=sig,
            extra_manifest={SECTION: section},
            describe_array=describe_array,
            extra_members=members,
        )
    finally:
        if to_save:
            shutil.rmtree(directory, ignore_errors=True)
        _barrier("archive_written", ARCHIVE_BARRIER_TIMEOUT_S)
    return result
