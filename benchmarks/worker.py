"""Benchmark tasks, each run in its own process by `benchmarks.run`.

Why separate processes: peak RSS is only meaningful per process, a read is
only cold in a process that has not just written the file, and a model of
1 GiB should not stay resident while the next size is measured. Each task
prints one line `RESULT <json>` on stdout; everything else is logging.

    python -m benchmarks.worker TASK '<json arguments>'

Tasks: `small` (a tiny archive for the process-time benchmark), `write`
(pack vs raw write+fsync vs the alternatives, per size), `read` (load vs raw
cold read vs the alternatives), `leaves` (per-leaf costs) and `compress`
(pack's size fitting on NaN-filled and zero-heavy weights).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._measure import PeakRSS, drop_cold, median, timed, warm

_RESULT = "RESULT "


def _emit(result: dict) -> None:
    print(_RESULT + json.dumps(result), flush=True)


def _log(message: str) -> None:
    print(f"[worker {os.getpid()}] {message}", file=sys.stderr, flush=True)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, files in os.walk(path)
            for name in files
        )
    return os.path.getsize(path)


def _aligned_empty(nbytes: int) -> np.ndarray:
    backing = np.empty(nbytes + 64, dtype=np.uint8)
    start = -backing.ctypes.data % 64
    return np.ndarray((nbytes,), np.uint8, buffer=backing, offset=start)


# ------------------------------------------------------------ the methods


def raw_write(path: str, arrays: list[np.ndarray]) -> None:
    """The physical baseline: every array's bytes, one after another, then fsync."""
    with open(path, "wb", buffering=0) as file:
        for array in arrays:
            view = memoryview(array.reshape(-1).view(np.uint8))
            while len(view):
                view = view[file.write(view) :]
        os.fsync(file.fileno())


_SYNC_FILE_RANGE_WRITE = 2


def raw_write_early(path: str, arrays: list[np.ndarray], step: int = 32 * 2**20) -> None:
    """The same with early writeback: `sync_file_range` every `step` bytes (Linux), then fsync.

    The tighter physical limit: the disk starts writing while later bytes are
    still being copied, as reprokit's archive writer does.
    """
    import ctypes

    start_writeback = ctypes.CDLL(None, use_errno=True).sync_file_range
    start_writeback.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    offset = flushed = 0
    with open(path, "wb", buffering=0) as file:
        for array in arrays:
            view = memoryview(array.reshape(-1).view(np.uint8))
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                while len(chunk):
                    written = file.write(chunk)
                    chunk = chunk[written:]
                    offset += written
                if offset - flushed >= step:
                    start_writeback(
                        file.fileno(), flushed, offset - flushed, _SYNC_FILE_RANGE_WRITE
                    )
                    flushed = offset
        os.fsync(file.fileno())


def raw_read(path: str, layout: list[int]) -> list[np.ndarray]:
    """The physical baseline: read each array's bytes into its own 64-byte-aligned buffer."""
    out = []
    with open(path, "rb", buffering=0) as file:
        for nbytes in layout:
            buffer = _aligned_empty(nbytes)
            view = memoryview(buffer)
            while len(view):
                count = file.readinto(view)
                if not count:
                    raise EOFError(path)
                view = view[count:]
            out.append(buffer)
    return out


def npz_write(path: str, arrays: list[np.ndarray]) -> None:
    np.savez(path, *arrays)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def npz_read(path: str) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[name] for name in data.files]


def pickle_write(path: str, parts: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(parts, file, protocol=5)
        file.flush()
        os.fsync(file.fileno())


def pickle_read(path: str) -> Any:
    with open(path, "rb") as file:
        return pickle.load(file)


class Orbax:
    """orbax-checkpoint's StandardCheckpointer, as a user would call it (plus os.sync for durability)."""

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self.checkpointer = ocp.StandardCheckpointer()

    def write(self, path: str, tree: Any) -> None:
        self.checkpointer.save(path, tree)
        self.checkpointer.wait_until_finished()
        # orbax leaves durability to the filesystem; raw and pack fsync.
        os.sync()

    def read(self, path: str) -> Any:
        import jax

        restored = self.checkpointer.restore(path)
        jax.block_until_ready(restored)
        return restored


def _capture(case: Any) -> tuple[Any, Any]:
    """(capture, record) as `pack` makes them: the model run once with the capturer."""
    from reprokit.capture._capture import capture_calls, choose_call

    capture = capture_calls(case.selection(), case.argument, dict(case.side_inputs), None)
    return capture, choose_call(capture, None)


def _first_record(case: Any) -> Any:
    return _capture(case)[1]


def _write_path(capture: Any, record: Any, out: str, stablehlo: tuple) -> Any:
    """`write_archive` with the StableHLO export given: encode, environment, manifest,
    archive stream, fsync, rename. (`pack` then also writes the issue snippet, timed apart.)
    """
    from reprokit.capture._options import PackOptions
    from reprokit.capture._write import write_archive

    return write_archive(
        record,
        out=out,
        keypath=capture.keypath,
        layer_type=capture.layer_type,
        mode=capture.mode,
        call_count=len(capture.calls),
        options=PackOptions(check=False),
        stablehlo=stablehlo,
        issue_snippet=False,
    )


# ------------------------------------------------------------ tasks


def task_small(args: dict) -> dict:
    """A tiny archive (one Linear of a small MLP) for the process-time benchmark."""
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models import simple_mlp

    import reprokit

    model = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 8, 4]
    )
    argument = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(1)
    result = reprokit.pack(selection, argument, out=args["path"], check=False)
    return {"path": result.path, "size": result.size, "arrays": result.array_count}


def task_write(args: dict) -> dict:
    """pack vs raw write+fsync vs np.savez / orbax / pickle, for one model size."""
    import json as json_module
    import zipfile

    import reprokit
    from benchmarks.models import build_case, record_arrays
    from reprokit.archive._grammar import unpack_bytes
    from reprokit.capture import _write
    from reprokit.record import _encoding, _stablehlo
    from reprokit.views._issue import write_issue_snippet

    folder, reps = args["dir"], args["repeats"]
    started = time.perf_counter()
    case = build_case(args["bytes"])
    capture, record = _capture(case)
    parts = _write._record_parts(record)
    arrays = record_arrays(record)
    nbytes = sum(a.nbytes for a in arrays)
    _log(f"built {case.name}: {len(arrays)} arrays, {nbytes / 2**20:.1f} MiB")
    paths = {
        "pack": os.path.join(folder, "model.repro.zip"),
        "write_path": os.path.join(folder, "write-path.repro.zip"),
        "stream": os.path.join(folder, "stream.repro.zip"),
        "raw": os.path.join(folder, "raw.bin"),
        "raw_early": os.path.join(folder, "raw-early.bin"),
        "npz": os.path.join(folder, "arrays.npz"),
        "orbax": os.path.abspath(os.path.join(folder, "orbax")),
        "pickle": os.path.join(folder, "record.pkl"),
    }

    def do_pack() -> Any:
        return reprokit.pack(
            case.selection(),
            case.argument,
            side_inputs=case.side_inputs,
            out=paths["pack"],
            check=False,
        )

    # The first pack also compiles the capture's eager ops; reported apart.
    first_pack, _, _ = timed(do_pack, warm_bytes=int(1.3 * nbytes))
    with zipfile.ZipFile(paths["pack"]) as archive:
        manifest = json_module.loads(archive.read("manifest.json"))
    encoded_arrays: list[Any] = []
    tree = _write._encode_record(record, encoded_arrays, ())
    stablehlo = _stablehlo.export_layer(parts)
    stablehlo_bytes = stablehlo[0]

    methods: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw_write(paths["raw"], arrays),
        "pack": do_pack,
        "write_path": lambda: _write_path(capture, record, paths["write_path"], stablehlo),
        "stream": lambda: _write._write(
            paths["stream"], manifest, tree, encoded_arrays, stablehlo_bytes, None
        ),
    }
    if sys.platform.startswith("linux"):
        methods["raw_early"] = lambda: raw_write_early(paths["raw_early"], arrays)
    orbax = None
    if args.get("alternatives", True):
        orbax = Orbax()
        methods.update(
            npz=lambda: npz_write(paths["npz"], arrays),
            orbax=lambda: orbax.write(paths["orbax"], parts),
            pickle=lambda: pickle_write(paths["pickle"], parts),
        )
    times: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, list[int]] = {name: [] for name in methods}
    breakdown: dict[str, list[float]] = {
        "capture": [],
        "encode": [],
        "stablehlo": [],
        "issue_snippet": [],
    }
    spent = {"prepare": 0.0, "warm_and_measure": 0.0, "measured": 0.0}
    _log(f"{case.name}: built and packed once in {time.perf_counter() - started:.1f}s")
    alternative_reps = args.get("alternative_repeats") or reps
    for rep in range(reps):
        for name, method in methods.items():
            if rep >= alternative_reps and name in ("npz", "orbax", "pickle"):
                continue
            start = time.perf_counter()
            _remove(paths[name])
            os.sync()
            spent["prepare"] += time.perf_counter() - start
            # pickle copies each array once more; the rest need page cache only.
            factor = 2.3 if name == "pickle" else 1.3
            start = time.perf_counter()
            seconds, extra, _ = timed(method, warm_bytes=int(factor * nbytes))
            spent["warm_and_measure"] += time.perf_counter() - start
            spent["measured"] += seconds
            times[name].append(seconds)
            peaks[name].append(extra)
        start = time.perf_counter()
        fresh = _first_record(case)
        breakdown["capture"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _write._encode_record(fresh, [], ())
        breakdown["encode"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _stablehlo.export_layer(_write._record_parts(fresh))
        breakdown["stablehlo"].append(time.perf_counter() - start)
        # pack's last step: NAME.issue.md, which holds the archive's sha256,
        # rendered from the manifest and structure pack holds (no reopening).
        start = time.perf_counter()
        write_issue_snippet(
            paths["pack"],
            manifest=manifest,
            structure=unpack_bytes(_encoding.pack_bytes(tree)),
        )
        breakdown["issue_snippet"].append(time.perf_counter() - start)
        del fresh
        _log(
            f"{case.name} write rep {rep + 1}/{reps}: "
            + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
        )

    self_check = None
    if args.get("self_check", True):
        from reprokit.capture._selfcheck import self_check as run_self_check

        start = time.perf_counter()
        outcome = run_self_check(paths["pack"])
        self_check = {"seconds": time.perf_counter() - start, "ran": bool(outcome.get("ran"))}

    _log(f"{case.name}: time spent " + ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()))
    _remove(paths["raw_early"])
    for name in ("stream", "write_path"):
        _remove(paths[name])
        _remove(paths[name].removesuffix(".repro.zip") + ".issue.md")
    return {
        "name": case.name,
        "array_bytes": nbytes,
        "array_count": len(arrays),
        "first_pack_s": first_pack,
        "times": times,
        "peaks": peaks,
        "breakdown": breakdown,
        "self_check": self_check,
        "file_bytes": {k: _size_of(p) for k, p in paths.items() if os.path.exists(p)},
        "layout": [int(a.nbytes) for a in arrays],
        "paths": paths,
        "elapsed_s": time.perf_counter() - started,
    }


def task_read(args: dict) -> dict:
    """reprokit.load vs raw cold read vs np.load / orbax restore / pickle.load, for one size."""
    import gc

    import jax
    from penzai import pz  # noqa: F401 (imported before timing, as `reprokit run` does)

    import reprokit

    started = time.perf_counter()
    paths, layout, reps = args["paths"], args["layout"], args["repeats"]
    nbytes = sum(layout)
    # Lazy imports of the load path happen here, not in the first timed load.
    reprokit.load(args["warmup_archive"])
    jax.block_until_ready(jax.device_put(np.ones(16)))

    methods: dict[str, tuple[Callable[[], Any], list[str]]] = {
        "raw": (lambda: raw_read(paths["raw"], layout), [paths["raw"]]),
        "load": (lambda: reprokit.load(paths["pack"]), [paths["pack"]]),
    }
    if args.get("alternatives", True):
        orbax = Orbax()
        warm_dir = os.path.join(os.path.dirname(paths["orbax"]), "orbax-warmup")
        _remove(warm_dir)
        orbax.write(warm_dir, {"x": np.ones(4)})
        orbax.read(warm_dir)
        _remove(warm_dir)
        methods.update(
            npz=(lambda: npz_read(paths["npz"]), [paths["npz"]]),
            orbax=(lambda: orbax.read(paths["orbax"]), [paths["orbax"]]),
            pickle=(lambda: pickle_read(paths["pickle"]), [paths["pickle"]]),
        )
    times: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, list[int]] = {name: [] for name in methods}
    cold = None
    alternative_reps = args.get("alternative_repeats") or reps
    for rep in range(reps):
        for name, (method, files) in methods.items():
            if rep >= alternative_reps and name in ("npz", "orbax", "pickle"):
                continue
            cold = drop_cold(files)
            seconds, extra, result = timed(method, warm_bytes=int(2.3 * nbytes))
            del result
            gc.collect()
            times[name].append(seconds)
            peaks[name].append(extra)
        _log(
            f"read rep {rep + 1}/{reps}: "
            + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
        )
    return {
        "times": times,
        "peaks": peaks,
        "cold_method": cold,
        "peak_method": PeakRSS.method,
        "elapsed_s": time.perf_counter() - started,
    }


def _leafy_identity(count: int) -> Any:
    """An Identity layer called on a tuple of `count` 1-KiB arrays: leaves without layers."""
    import jax
    from penzai import pz

    from benchmarks.models import Case

    rng = np.random.default_rng(count)
    argument = tuple(
        jax.device_put(rng.standard_normal(256, dtype=np.float32)) for _ in range(count)
    )
    return Case(f"{count}", pz.nn.Sequential([pz.nn.Identity()]), argument, {})


def task_leaves(args: dict) -> dict:
    """Per-leaf cost: pack/load/raw/np/orbax for 10 -> 10,000 small leaves (hot page cache)."""
    import gc

    import jax

    import reprokit
    from benchmarks.models import build_leafy, record_arrays
    from reprokit.capture import _write
    from reprokit.record import _stablehlo

    folder = args["dir"]
    rows = []
    for count in args["counts"]:
        case = _leafy_identity(count)
        record = _first_record(case)
        arrays = record_arrays(record)
        parts = _write._record_parts(record)
        layout = [a.nbytes for a in arrays]
        paths = {
            "pack": os.path.join(folder, f"leaves{count}.repro.zip"),
            "raw": os.path.join(folder, f"leaves{count}.bin"),
            "npz": os.path.join(folder, f"leaves{count}.npz"),
            "orbax": os.path.abspath(os.path.join(folder, f"leaves{count}-orbax")),
        }

        def do_pack(case=case, out=paths["pack"]) -> Any:
            return reprokit.pack(case.selection(), case.argument, out=out, check=False)

        do_pack()
        reprokit.load(paths["pack"])
        writes: dict[str, Callable[[], Any]] = {
            "raw": lambda a=arrays, p=paths["raw"]: raw_write(p, a),
            "pack": do_pack,
            "npz": lambda a=arrays, p=paths["npz"]: npz_write(p, a),
        }
        reads: dict[str, Callable[[], Any]] = {
            "raw": lambda p=paths["raw"], lay=layout: raw_read(p, lay),
            "load": lambda p=paths["pack"]: reprokit.load(p),
            "npz": lambda p=paths["npz"]: npz_read(p),
        }
        if count <= args["orbax_max"]:
            orbax = Orbax()
            writes["orbax"] = lambda o=orbax, p=paths["orbax"], t=parts: o.write(p, t)
            reads["orbax"] = lambda o=orbax, p=paths["orbax"]: o.read(p)
        reps = args["repeats"] if count <= 1000 else max(1, args["repeats"] // 2)
        row: dict[str, Any] = {"leaves": len(arrays), "write": {}, "read": {}}
        for _ in range(reps):
            for name, method in writes.items():
                _remove(paths[name])
                os.sync()
                row["write"].setdefault(name, []).append(timed(method)[0])
            for name, method in reads.items():
                seconds, _, result = timed(method)
                del result
                row["read"].setdefault(name, []).append(seconds)
        start = time.perf_counter()
        _stablehlo.export_layer(parts)
        row["stablehlo_s"] = time.perf_counter() - start
        rows.append(row)
        for path in paths.values():
            _remove(path)
        del case, record, arrays, parts
        gc.collect()
        _log(
            f"leaves {count}: pack {median(row['write']['pack']):.3f}s "
            f"load {median(row['read']['load']):.3f}s"
        )

    layered = []
    for count in args["layer_counts"]:
        case = build_leafy(count)
        out = os.path.join(folder, f"layers{count}.repro.zip")
        pack_s = timed(
            lambda c=case, o=out: reprokit.pack(c.selection(), c.argument, out=o, check=False)
        )[0]
        load_s = timed(lambda o=out: reprokit.load(o))[0]
        start = time.perf_counter()
        _first_record(case)
        capture_s = time.perf_counter() - start
        layered.append(
            {"layers": count, "pack_s": pack_s, "load_s": load_s, "capture_s": capture_s}
        )
        _remove(out)
        _log(f"layers {count}: pack {pack_s:.3f}s load {load_s:.3f}s")
        del case
        jax.clear_caches()
    return {"rows": rows, "layered": layered}


def _compress_row(pattern: str, case: Any, folder: str) -> dict:
    """One row of `task_compress`: plain pack, pack(max_size=25MB), and the mechanism alone."""
    import json as json_module
    import zipfile

    import reprokit
    from benchmarks.models import record_arrays
    from reprokit.capture import _redact, _write
    from reprokit.record import _stablehlo

    _, record = _capture(case)
    nbytes = sum(a.nbytes for a in record_arrays(record))
    paths = {
        name: os.path.join(folder, f"{pattern}-{name}.repro.zip")
        for name in ("plain", "fitted", "stream", "deflated")
    }

    def pack(out: str, max_size: str | None) -> Any:
        return reprokit.pack(
            case.selection(),
            case.argument,
            side_inputs=case.side_inputs,
            out=out,
            check=False,
            max_size=max_size,
        )

    pack(paths["plain"], None)  # compiles the capture's ops
    plain_s, plain_peak, _ = timed(lambda: pack(paths["plain"], None), warm_bytes=int(1.3 * nbytes))
    row: dict[str, Any] = {
        "pattern": pattern,
        "array_bytes": nbytes,
        "plain_s": plain_s,
        "plain_bytes": os.path.getsize(paths["plain"]),
        "plain_peak": plain_peak,
    }
    try:
        fit_s, fit_peak, _ = timed(
            lambda: pack(paths["fitted"], "25MB"), warm_bytes=int(2.3 * nbytes)
        )
        start = time.perf_counter()
        reprokit.load(paths["fitted"])
        row.update(
            fitted_s=fit_s,
            fitted_bytes=os.path.getsize(paths["fitted"]),
            fitted_peak=fit_peak,
            fitted_load_s=time.perf_counter() - start,
        )
    except Exception as error:  # a bug in the size fitting must not end the benchmark
        row["fitted_error"] = " ".join(f"{type(error).__name__}: {error}".split())[:200]

    with zipfile.ZipFile(paths["plain"]) as archive:
        manifest = json_module.loads(archive.read("manifest.json"))
    stablehlo = _stablehlo.export_layer(_write._record_parts(record))[0]
    plain_arrays: list[Any] = []
    plain_tree = _write._encode_record(record, plain_arrays, ())
    fit_arrays: list[Any] = []
    fit_tree = _write._encode_record(record, fit_arrays, (), all_fills=True)

    def plain_stream() -> None:
        _write._write(paths["stream"], manifest, plain_tree, plain_arrays, stablehlo, None)

    def deflated_stream() -> dict:
        plan = _redact.compression_plan(fit_arrays)
        compress = set(plan["compress"])
        _write._write(paths["deflated"], manifest, fit_tree, fit_arrays, stablehlo, None, compress)
        return plan

    stream_s = timed(plain_stream, warm_bytes=int(1.3 * nbytes))[0]
    deflate_s, deflate_peak, plan = timed(deflated_stream, warm_bytes=int(2.3 * nbytes))
    row.update(
        stream_s=stream_s,
        deflated_s=deflate_s,
        deflated_bytes=os.path.getsize(paths["deflated"]),
        deflated_members=len(plan["compress"]),
        deflated_peak=deflate_peak,
    )
    for path in paths.values():
        _remove(path)
        _remove(path.removesuffix(".repro.zip") + ".issue.md")
    return row


def task_compress(args: dict) -> dict:
    """pack's size fitting (deflate per member where it pays) on NaN-filled / 99%-zero weights.

    Measures `pack(max_size="25MB")` as a user calls it and, apart, the
    mechanism alone: the compression plan plus the archive stream with the
    planned members deflated, against the plain archive stream.
    """
    from benchmarks.models import build_case, fill_special

    # float32 only: reprokit.capture._redact.compressed_size takes a memoryview of the
    # array, which has no format for bfloat16 ("cannot include dtype 'E'").
    base = build_case(args["bytes"], small_leaves=20, bf16=args.get("bf16", False))
    rows = []
    for pattern in ("nan", "sparse"):
        rows.append(_compress_row(pattern, fill_special(base, pattern), args["dir"]))
        _log(f"compress {pattern}: {rows[-1]}")
    return {"rows": rows}


# ------------------------------------------------------------ round 2 (issue 17)


def _small_case() -> Any:
    """One Linear of a small MLP (the `small` archive): a layer whose forward takes milliseconds."""
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models import simple_mlp

    from benchmarks.models import Case

    model = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 8, 4]
    )
    argument = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    case = Case("small", model, argument, {})
    case.selection = lambda: pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(1)
    return case


def _interleaved(methods: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Times each method `repeats` times, round-robin, so that load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            gc.collect()
            start = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - start)
    return times


def task_fixed(args: dict) -> dict:
    """Target 1: pack(check=False) of a small layer vs one eager forward + one jit lowering.

    The floor is what capturing and exporting cannot avoid: the model run
    once (eagerly, as the capture runs it) and the selected layer lowered
    once with `jax.jit(...).lower()` (a fresh function each time, as pack's
    export is never cached). Both are timed in this process after a warm-up.
    Target 2's in-process half: the self-check (`check=True` adds it) vs one
    `reprokit run` of the same archive, both whole fresh processes.
    """
    import subprocess

    import jax

    import reprokit
    from reprokit.capture._selfcheck import self_check

    case = _small_case()
    out = os.path.join(args["dir"], "fixed.repro.zip")

    def forward() -> Any:
        return jax.block_until_ready(case.model(case.argument))

    # The selected layer's own input: what the lowering is traced with.
    captured = _capture(case)[1]
    inner, layer_input = captured.submodel, captured.argument

    def lower() -> Any:
        def call(submodel, x):  # a new function each time: no lowering cache
            return submodel(x)

        return jax.jit(call).lower(inner, layer_input)

    def export() -> Any:
        # What jax itself charges on top of lower() for a portable artifact
        # (a second MLIR context, the calling-convention wrapper, serialization).
        def call(submodel, x):
            return submodel(x)

        return jax.export.export(jax.jit(call))(inner, layer_input)

    def pack() -> Any:
        return reprokit.pack(case.selection(), case.argument, out=out, check=False, quiet=True)

    pack()
    forward()
    lower()
    export()
    reps = args.get("repeats", 7)
    times = _interleaved(
        {"pack": pack, "forward": forward, "lower": lower, "export": export}, reps
    )
    result: dict[str, Any] = {"times": times}
    if args.get("self_check", True):
        reprokit.pack(case.selection(), case.argument, out=out, check=False, quiet=True)
        script = os.path.join(os.path.dirname(sys.executable), "reprokit")
        reprokit_command = [script] if os.path.exists(script) else [sys.executable, "-m", "reprokit"]
        run = [*reprokit_command, "run", out]
        env = dict(os.environ)
        subprocess.run(run, env=env, capture_output=True, stdin=subprocess.DEVNULL)
        self_check(out)

        def run_once() -> None:
            subprocess.run(run, env=env, capture_output=True, stdin=subprocess.DEVNULL)

        result["self_check"] = _interleaved(
            {"self_check": lambda: self_check(out), "run": run_once}, max(3, reps // 2)
        )
    _remove(out)
    _remove(out.removesuffix(".repro.zip") + ".issue.md")
    return result


def _named_dict_case(count: int) -> Any:
    """An Identity layer called on a dict of `count` 1-KiB `NamedArray`s (issue 17's worst case)."""
    import jax
    from penzai import pz

    from benchmarks.models import Case

    rng = np.random.default_rng(count)
    argument = {
        f"x{i}": pz.nx.wrap(jax.device_put(rng.standard_normal(256, dtype=np.float32)), "a")
        for i in range(count)
    }
    return Case(f"{count}named", pz.nn.Sequential([pz.nn.Identity()]), argument, {})


def _export_alone(record: Any, repeats: int) -> list[float]:
    """Times pack's StableHLO export of `record` alone, as pack runs it (cyclic GC paused)."""
    from reprokit.archive._collector import collector_paused
    from reprokit.capture import _write
    from reprokit.record import _stablehlo

    def export() -> Any:
        with collector_paused():
            return _stablehlo.export_layer(_write._record_parts(record))

    return _interleaved({"export": export}, repeats)["export"]


def task_perleaf(args: dict) -> dict:
    """Target 3: per-leaf costs against np.savez / np.load, linear growth, 1,000 layers.

    Rows: pack of N plain leaves and of N NamedArray leaves in a dict vs
    np.savez of the same arrays (+fsync); load vs np.load (hot page cache);
    pack at 2N over pack at N (linear growth shows as 2.0); pack of an
    L-layer Sequential vs one eager forward of it plus np.savez of its arrays.
    Also pack's StableHLO export alone (jax's lowering: per argument, in jax).
    """
    import jax

    import reprokit
    from benchmarks.models import build_leafy, record_arrays

    folder, reps = args["dir"], args.get("repeats", 3)
    count = args.get("leaves", 10000)
    rows: dict[str, Any] = {}
    cases = [
        ("plain", _leafy_identity(count)),
        ("named", _named_dict_case(count)),
        ("plain_double", _leafy_identity(2 * count)),
    ]
    # Every method of every case in one interleaved loop: the N and 2N rows
    # (linear growth) are only comparable if load drifts hit both alike.
    methods: dict[str, Callable[[], Any]] = {}
    records = {}
    for name, case in cases:
        record = records[name] = _first_record(case)
        arrays = record_arrays(record)
        pack_path = os.path.join(folder, f"perleaf-{name}.repro.zip")
        npz_path = os.path.join(folder, f"perleaf-{name}.npz")

        def do_pack(case=case, out=pack_path) -> Any:
            return reprokit.pack(case.selection(), case.argument, out=out, check=False, quiet=True)

        do_pack()
        npz_write(npz_path, arrays)
        methods.update(
            {
                f"{name}/pack": do_pack,
                f"{name}/npz": lambda a=arrays, p=npz_path: npz_write(p, a),
                f"{name}/load": lambda p=pack_path: reprokit.load(p),
                f"{name}/npz_load": lambda p=npz_path: npz_read(p),
            }
        )
        rows[name] = {"leaves": len(arrays), "times": {}}
    times = _interleaved(methods, reps)
    for key, values in times.items():
        name, method = key.split("/")
        rows[name]["times"][method] = values
    for name, _ in cases:
        # After the interleaved loop, not in it: each export leaves jax's caches
        # a 10,000-argument function bigger, which slowed the packs timed after it.
        rows[name]["times"]["export"] = _export_alone(records[name], reps)
        rows[name]["stablehlo_s"] = median(rows[name]["times"]["export"])
        for path in (
            os.path.join(folder, f"perleaf-{name}.repro.zip"),
            os.path.join(folder, f"perleaf-{name}.issue.md"),
            os.path.join(folder, f"perleaf-{name}.npz"),
        ):
            _remove(path)
        _log(
            f"perleaf {name}: "
            + ", ".join(f"{k} {median(v):.3f}s" for k, v in rows[name]["times"].items())
        )
    del cases, records, methods
    gc.collect()

    layers = args.get("layers", 1000)
    case = build_leafy(layers)
    record = _first_record(case)
    arrays = record_arrays(record)
    out = os.path.join(folder, "layers.repro.zip")
    npz = os.path.join(folder, "layers.npz")

    def forward() -> Any:
        return jax.block_until_ready(case.model(case.argument))

    def do_pack() -> Any:
        return reprokit.pack(case.selection(), case.argument, out=out, check=False, quiet=True)

    do_pack()
    forward()
    times = _interleaved(
        {"pack": do_pack, "forward": forward, "npz": lambda: npz_write(npz, arrays)}, reps
    )
    times["export"] = _export_alone(record, reps)
    rows["layers"] = {"layers": layers, "times": times, "stablehlo_s": median(times["export"])}
    for path in (out, npz, out.removesuffix(".repro.zip") + ".issue.md"):
        _remove(path)
    return rows


def task_find(args: dict) -> dict:
    """Target 4: find(check="mismatch") vs one plain eager forward of the same model.

    The tiny llama-like transformer of `benchmarks/bench_find_watch.py`,
    healthy (find raises CaptureError when nothing exceeds the tolerance:
    the whole search still runs). Interleaved repeats in this process.
    """
    import jax

    import reprokit
    from benchmarks.bench_find_watch import build, inputs

    tokens, side = inputs()
    model = build()

    def forward() -> Any:
        return jax.block_until_ready(model(tokens, **side))

    def mismatch() -> None:
        try:
            reprokit.search(model, tokens, side_inputs=side, check="mismatch")
        except reprokit.CaptureError:
            pass  # healthy model: nothing over the tolerance

    forward()
    mismatch()
    return {"times": _interleaved({"find": mismatch, "forward": forward}, args.get("repeats", 5))}


# Runs the CLI, then reports the process's own peak RSS (VmHWM starts afresh
# at exec; the rusage of a child also counts the forked parent's pages).
_CLI_WITH_PEAK = """
import sys
sys.argv = ["reprokit", *sys.argv[1:]]
from reprokit._cli import main
try:
    main()
except SystemExit as done:
    code = done.code
else:
    code = 0
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print(f"PEAK_KIB {peak}", file=sys.stderr)
sys.exit(code)
"""


def _peak_child_rss(arguments: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one `reprokit ARGUMENTS` process."""
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CLI_WITH_PEAK, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{arguments[-2:]} exited {done.returncode}: {done.stderr[-500:]}")
    peak = next(
        (int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")),
        0,
    )
    return elapsed, peak * 1024


def task_inspect(args: dict) -> dict:
    """Target 5: `reprokit inspect` of archives of N and 2N small arrays: time and peak RSS.

    The archives are written by `write_archive` from an Identity layer called
    on N 16-byte arrays, without the StableHLO export (jax's lowering of
    100,000 arguments would dominate the setup, and inspect does not read
    the module). Each inspect is a fresh process, as a maintainer runs it.
    """
    from reprokit.capture._options import PackOptions
    from reprokit.capture._write import write_archive

    folder, reps = args["dir"], args.get("repeats", 3)
    rows = []
    for count in args.get("counts", (50000, 100000)):
        import jax
        from penzai import pz

        from benchmarks.models import Case

        argument = tuple(jax.device_put(np.full(4, i, np.float32)) for i in range(count))
        case = Case(f"{count}", pz.nn.Sequential([pz.nn.Identity()]), argument, {})
        capture, record = _capture(case)
        out = os.path.join(folder, f"inspect{count}.repro.zip")
        write_archive(
            record,
            out=out,
            keypath=capture.keypath,
            layer_type=capture.layer_type,
            mode=capture.mode,
            options=PackOptions(check=False),
            stablehlo=(None, {"error": "not exported for this benchmark"}),
            issue_snippet=False,
        )
        # Default limits: an archive of N arrays has N + 5 members, within the
        # default 200,000, as a maintainer runs it.
        command = ["inspect", out]
        _peak_child_rss(command)  # page cache and bytecode warm
        runs = [_peak_child_rss(command) for _ in range(reps)]
        rows.append(
            {
                "arrays": count,
                "times": [t for t, _ in runs],
                "peak_rss": [r for _, r in runs],
                "file_bytes": os.path.getsize(out),
            }
        )
        _remove(out)
        _log(f"inspect {count}: {median(rows[-1]['times']):.3f}s")
        del argument, case, capture, record
        gc.collect()
    # The floor of a fresh process importing reprokit's CLI (peak RSS baseline).
    base = [_peak_child_rss(["--help"]) for _ in range(reps)]
    return {"rows": rows, "base_times": [t for t, _ in base], "base_rss": [r for _, r in base]}


TASKS = {
    "fixed": task_fixed,
    "perleaf": task_perleaf,
    "find": task_find,
    "inspect": task_inspect,
    "small": task_small,
    "write": task_write,
    "read": task_read,
    "leaves": task_leaves,
    "compress": task_compress,
}


def main(argv: list[str] | None = None) -> None:
    """Runs one task: `python -m benchmarks.worker TASK JSON_ARGS`."""
    argv = sys.argv[1:] if argv is None else argv
    task, raw_args = argv[0], json.loads(argv[1])
    warm(0)
    with PeakRSS():
        pass
    _emit(TASKS[task](raw_args))


if __name__ == "__main__":
    main()
