"""Replays under varied conditions: repeats, a sweep of variants, and references.

A verdict on one machine says whether the bug is real; a maintainer also
needs to know where it comes from. Replaying the same record several times
separates nondeterminism from bugs; replaying it eagerly and under jit, at
higher matmul precision, in float64, on each platform, with and without the
recorded XLA flags, and as bare StableHLO points at framework, compiler,
precision or hardware. Each condition is measured, never assumed.

Conditions that need a fresh process (x64, XLA flags, StableHLO) run as
workers (`python -m reprokit.replaying._variants`) in parallel with the in-process ones,
so a sweep keeps both cores busy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from reprokit._errors import ReplayError, UsageError
from reprokit._progress import progress
from reprokit._workers import (
    WorkerFailed,
    limits_from_argv,
    limits_to_argv,
    python_command,
    run_worker,
    worker_env,
)
from reprokit.archive._container import Limits
from reprokit.archive._trust import TrustPolicy

REFERENCES = ("float64", "highest", "eager", "cpu")
_WORKER_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class VariantRow:
    """One condition of a sweep: whether it ran, reproduced, and how far the output moved."""

    condition: str
    ran: bool
    reproduced: bool | None = None
    output_bitwise_equal: bool | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    # reprokit's error metric (portable._verdict.ERROR_METRIC): abs above, rel here.
    rel_error: float | None = None
    note: str = ""
    started: float = 0.0
    elapsed_s: float = 0.0


def _judge_row(
    condition: str, signature: dict, recorded: dict, replayed: dict, started: float, note: str = ""
):
    from reprokit.portable._verdict import judge

    replayed = _cast_like(recorded, replayed)
    verdict = judge(signature, recorded, replayed)
    rows = [r for r in verdict["output"] if r["status"] == "differs"]
    return VariantRow(
        condition=condition,
        ran=True,
        reproduced=bool(verdict["reproduced"]),
        output_bitwise_equal=bool(verdict["output_bitwise_equal"]) if recorded["output"] else None,
        max_abs_error=max((r["max_abs_error"] for r in rows), default=None),
        max_rel_error=max((r["max_rel_error"] or 0.0 for r in rows), default=None),
        rel_error=max((r["rel_error"] or 0.0 for r in rows), default=None),
        note=note or ("" if verdict["reproduced"] else verdict["reason"]),
        started=started,
        elapsed_s=time.perf_counter() - started,
    )


def _cast_like(recorded: dict, replayed: dict) -> dict:
    """Casts replayed leaves to the recorded dtypes (float64 variants are compared that way).

    Outputs, and the gradients of a gradient issue (`nonfinite_grad`).
    """
    cast = dict(replayed)
    for part in ("output", "gradients"):
        if part not in replayed:
            continue
        want = {path: leaf.dtype for path, leaf in recorded.get(part) or []}
        leaves = []
        for path, leaf in replayed.get(part) or []:
            dtype = want.get(path)
            leaves.append(
                (path, leaf.astype(dtype) if dtype is not None and leaf.dtype != dtype else leaf)
            )
        cast[part] = leaves
    return cast


# ------------------------------------------------------------------ in-process conditions


def _upcast(tree: Any) -> Any:
    import jax
    import jax.numpy as jnp

    def cast(leaf):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(jnp.float64)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def upcast_record(record: dict) -> dict:
    """The record's layer, inputs and state with every floating array in float64."""
    parts = ("submodel", "argument", "side_inputs", "initial_var_values")
    return {**record, **{name: _upcast(record[name]) for name in parts}}


def _in_process(loaded, condition: str, *, mode=None, precision=None, device=None):
    import jax

    from reprokit.replaying._replay import recorded_outcome, replayed_outcome

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if precision is not None:
            stack.enter_context(jax.default_matmul_precision(precision))
        if device is not None:
            stack.enter_context(jax.default_device(device))
        replayed = replayed_outcome(loaded, mode=mode)
    return _judge_row(
        condition, loaded.manifest["signature"], recorded_outcome(loaded), replayed, started
    )


def _platform_rows(loaded) -> list[VariantRow]:
    import jax

    rows = []
    for platform in ("cpu", "gpu", "tpu"):
        try:
            devices = jax.devices(platform)
        except RuntimeError:
            rows.append(
                VariantRow(
                    condition=f"platform {platform}", ran=False, note=f"no {platform} device here"
                )
            )
            continue
        rows.append(
            _in_process(
                loaded, f"platform {platform} ({devices[0].device_kind})", device=devices[0]
            )
        )
    return rows


# ------------------------------------------------------------------ worker conditions


def _worker_env(variant: str, loaded) -> dict[str, str] | None:
    env = dict(os.environ)
    if variant == "xla-flags-none":
        env["XLA_FLAGS"] = ""
    elif variant == "xla-flags-recorded":
        from reprokit.environment._config import check_xla_flags, replayable_xla_flags

        flags, _ = replayable_xla_flags(loaded.manifest["environment"].get("xla_flags") or [])
        accepted, _ = check_xla_flags(flags)
        env["XLA_FLAGS"] = " ".join(accepted)
    return env


def _run_worker(path: str, variant: str, condition: str, options: list[str], env) -> VariantRow:
    started = time.perf_counter()
    args = [str(path), variant, *options]
    try:
        row = run_worker("reprokit.replaying._variants", args, env=env, timeout=_WORKER_TIMEOUT_S)
    except WorkerFailed as error:
        return VariantRow(
            condition=condition, ran=False, note=f"worker failed: {error}", started=started
        )
    row.update(condition=condition, started=started, elapsed_s=time.perf_counter() - started)
    return VariantRow(**row)


def _worker_main(argv: list[str]) -> int:
    """`python -m reprokit.replaying._variants ARCHIVE VARIANT [TRUST...]`: one row as JSON.

    TRUST is the sweep's `TrustPolicy`, as `TrustPolicy.to_argv` writes it,
    and the caller's archive limits (`reprokit._workers.limits_to_argv`).
    """
    path, variant, *rest = argv
    from reprokit.replaying._replay import (
        load_archive,
        recorded_outcome,
        replayed_outcome,
        stablehlo_outcome,
    )

    started = time.perf_counter()
    try:
        trust, limits = TrustPolicy.from_argv(rest), limits_from_argv(rest)
        if variant == "x64":
            loaded = load_archive(
                path, trust, limits=limits, config_overrides={"jax_enable_x64": True}
            )
            replayed = replayed_outcome(loaded, record=upcast_record(loaded.record))
            note = "float64 params and inputs, compared after casting back"
        elif variant == "stablehlo":
            loaded = load_archive(path, trust, limits=limits)
            replayed = stablehlo_outcome(loaded)
            note = ""
        elif variant.startswith("xla-flags-"):
            loaded = load_archive(path, trust, limits=limits)
            replayed = replayed_outcome(loaded)
            note = f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        else:
            raise UsageError(f"unknown variant {variant!r}")
        row = _judge_row(
            variant, loaded.manifest["signature"], recorded_outcome(loaded), replayed, started, note
        )
    except Exception as error:  # reported as the row's note; the sweep goes on
        row = VariantRow(
            condition=variant,
            ran=False,
            note=" ".join(f"{type(error).__name__}: {error}".split())[:200],
        )
    print(
        json.dumps(
            {
                k: v
                for k, v in dataclasses.asdict(row).items()
                if k not in ("condition", "started", "elapsed_s")
            }
        )
    )
    return 0


# ------------------------------------------------------------------ public entry points


def sweep(
    path: str,
    loaded,
    trust: TrustPolicy,
    workers: int | None = None,
    *,
    limits: Limits | None = None,
) -> list[VariantRow]:
    """Replays under every condition; worker conditions run in parallel with in-process ones.

    Worker processes reopen `path` themselves, under the same `trust` and `limits`.
    """
    recorded_mode = loaded.manifest["mode"]
    env = loaded.manifest["environment"]
    jobs = [("x64", "x64 on (float64 params)")]
    if env.get("xla_flags"):
        jobs += [
            ("xla-flags-recorded", "XLA flags as recorded"),
            ("xla-flags-none", "XLA flags none"),
        ]
    if (
        isinstance(loaded.manifest.get("stablehlo"), dict)
        and "error" not in loaded.manifest["stablehlo"]
    ):
        jobs.append(("stablehlo", "StableHLO artifact (jit, no penzai)"))
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    rows: list[VariantRow] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(
                _run_worker,
                path,
                variant,
                condition,
                trust.to_argv() + limits_to_argv(limits),
                _worker_env(variant, loaded),
            )
            for variant, condition in jobs
        ]
        conditions = [
            (f"as recorded ({recorded_mode})", {}),
            ("eager", {"mode": "eager"}),
            ("jit", {"mode": "jit"}),
            ("eager, matmul precision highest", {"mode": "eager", "precision": "highest"}),
            ("jit, matmul precision highest", {"mode": "jit", "precision": "highest"}),
        ]
        with progress(len(conditions) + 1 + len(futures), "sweeping") as advance:
            for condition, options in conditions:
                rows.append(_in_process(loaded, condition, **options))
                advance(1)
            rows += _platform_rows(loaded)
            advance(1)
            if not env.get("xla_flags"):
                rows.append(
                    VariantRow(
                        condition="XLA flags",
                        ran=False,
                        note="none recorded; same as 'as recorded'",
                    )
                )
            for future in futures:
                rows.append(future.result())
                advance(1)
    return rows


def format_sweep(rows: list[VariantRow]) -> str:
    """The sweep as an aligned table."""
    table = [("condition", "ran", "reproduced", "output vs recorded")]
    for row in rows:
        if not row.ran:
            table.append((row.condition, "no", "-", row.note))
            continue
        if row.output_bitwise_equal:
            distance = "bitwise equal"
        elif row.max_abs_error is not None:
            distance = f"error abs {row.max_abs_error:.3g}, rel {row.rel_error or 0:.3g}"
        else:
            distance = row.note or "-"
        table.append((row.condition, "yes", "yes" if row.reproduced else "NO", distance))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in table
    )


def repeat(loaded, times: int) -> dict:
    """Replays `times` times, with a fresh compile each time, and reports bitwise stability."""
    import jax

    from reprokit.portable import _calling
    from reprokit.replaying._replay import replayed_outcome

    if times < 2:
        raise UsageError("--repeat needs at least 2 runs")
    first = None
    for run in range(times):
        if loaded.manifest["mode"] == "jit":
            # Recompile each time, as a new process would: compilation can be nondeterministic.
            jax.clear_caches()
            _calling._jitted = None
        outcome = replayed_outcome(loaded)
        if first is None:
            first = outcome
            continue
        difference = _first_difference(first, outcome)
        if difference is not None:
            return {
                "runs": run + 1,
                "requested": times,
                "bitwise_identical": False,
                "first_difference": {"run": run, **difference},
            }
    return {"runs": times, "requested": times, "bitwise_identical": True, "first_difference": None}


def _first_difference(first: dict, other: dict) -> dict | None:
    if (first["exception"] is None) != (other["exception"] is None):
        return {"path": "(outcome)", "detail": "raised in one run and returned in another"}
    if first["exception"] is not None:
        same = first["exception"] == other["exception"]
        return None if same else {"path": "(exception)", "detail": "different exceptions"}
    for kind in ("output", "state"):
        for (path, a), (_, b) in zip(first[kind], other[kind], strict=True):
            if a.tobytes() == b.tobytes():
                continue
            flat_a, flat_b = a.reshape(-1), b.reshape(-1)
            index = _first_index(flat_a, flat_b)
            return {
                "path": path,
                "index": [int(i) for i in np.unravel_index(index, a.shape)] if a.shape else [],
                "first_run": _scalar(flat_a[index]),
                "this_run": _scalar(flat_b[index]),
            }
    return None


def _first_index(a: np.ndarray, b: np.ndarray) -> int:
    bytes_a = a.view(np.uint8).reshape(a.size, -1)
    bytes_b = b.view(np.uint8).reshape(b.size, -1)
    return int(np.flatnonzero((bytes_a != bytes_b).any(axis=1))[0])


def _scalar(value) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def reference(
    path: str, loaded, kind: str, trust: TrustPolicy, *, limits: Limits | None = None
) -> dict:
    """Errors of the recorded and the replayed output against a reference computation.

    The float64 reference runs in a worker process that reopens `path` under
    `trust` and `limits`.
    """
    from reprokit.portable._verdict import ERROR_METRIC, compare_leaves
    from reprokit.replaying._replay import recorded_outcome, replayed_outcome

    if kind not in REFERENCES:
        raise UsageError(f"--reference must be one of {', '.join(REFERENCES)}, not {kind!r}")
    if loaded.manifest["signature"]["kind"] == "exception":
        raise UsageError(
            "this archive recorded an exception; there is no output to compare with a reference"
        )
    replayed = replayed_outcome(loaded)
    if kind == "float64":
        reference_outcome = _float64_reference(path, trust.to_argv() + limits_to_argv(limits))
    else:
        import jax

        with contextlib.ExitStack() as stack:
            mode = "eager" if kind == "eager" else None
            if kind == "highest":
                stack.enter_context(jax.default_matmul_precision("highest"))
            if kind == "cpu":
                stack.enter_context(jax.default_device(jax.devices("cpu")[0]))
            reference_outcome = replayed_outcome(loaded, mode=mode)
    if reference_outcome["exception"] is not None:
        raise ReplayError(f"the {kind} reference raised {reference_outcome['exception']['type']}")
    ref = [(p, a.astype(np.float64)) for p, a in _compared(reference_outcome)]
    widen = lambda leaves: [(p, a.astype(np.float64)) for p, a in leaves]  # noqa: E731
    recorded_rows = compare_leaves(ref, widen(_compared(recorded_outcome(loaded))))
    replayed_rows = compare_leaves(ref, widen(_compared(replayed)))
    leaves = []
    for rec, rep in zip(recorded_rows, replayed_rows, strict=True):
        rec_err = 0.0 if rec["bitwise_equal"] else rec.get("max_abs_error", float("inf"))
        rep_err = 0.0 if rep["bitwise_equal"] else rep.get("max_abs_error", float("inf"))
        closer = "same" if rec_err == rep_err else "recorded" if rec_err < rep_err else "replayed"
        leaves.append(
            {
                "path": rec["path"],
                "recorded_max_abs_error": rec_err,
                "recorded_max_rel_error": 0.0 if rec["bitwise_equal"] else rec.get("max_rel_error"),
                "recorded_rel_error": _rel(rec),
                "replayed_max_abs_error": rep_err,
                "replayed_max_rel_error": 0.0 if rep["bitwise_equal"] else rep.get("max_rel_error"),
                "replayed_rel_error": _rel(rep),
                "closer": closer,
            }
        )
    return {"reference": kind, "error_metric": ERROR_METRIC, "leaves": leaves}


def _rel(row: dict) -> float:
    """The metric's rel part of a leaf compared with the reference (inf: not comparable)."""
    if row["bitwise_equal"]:
        return 0.0
    rel = row.get("rel_error")
    return float("inf") if rel is None else rel


def _compared(outcome: dict) -> list:
    """The leaves a reference is compared on: the output, and a gradient issue's gradients."""
    gradients = [(f"gradients[{path!r}]", a) for path, a in outcome.get("gradients") or []]
    return list(outcome["output"]) + gradients


def _float64_reference(path: str, options: list[str]) -> dict:
    """Float64 outputs from a worker process (x64 must be on before arrays exist)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        target = os.path.join(folder, "reference.npz")
        command = python_command(
            "reprokit.replaying._variants", args=[str(path), "x64-outputs", target, *options]
        )
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=worker_env(),  # isolated: nothing in the current folder is importable
            timeout=_WORKER_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0 or not os.path.exists(target):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise ReplayError(f"the float64 reference failed: {last}")
        with np.load(target, allow_pickle=False) as data:
            paths = json.loads(str(data["paths"]))
            return {
                "exception": None,
                "output": [(p, data[f"leaf{i}"]) for i, p in enumerate(paths)],
                "state": [],
            }


def format_reference(report: dict) -> str:
    """The reference comparison as an aligned table."""
    lines = [
        f"reference: {report['reference']}",
        f"error: {report.get('error_metric', 'abs / rel')}",
        "leaf  recorded error (abs/rel)  replayed error (abs/rel)  closer",
    ]
    for leaf in report["leaves"]:
        recorded = f"{leaf['recorded_max_abs_error']:.3g}/{leaf.get('recorded_rel_error', 0):.3g}"
        replayed = f"{leaf['replayed_max_abs_error']:.3g}/{leaf.get('replayed_rel_error', 0):.3g}"
        lines.append(f"{leaf['path']}  {recorded}  {replayed}  {leaf['closer']}")
    return "\n".join(lines)


def _x64_outputs_main(path: str, target: str, options: list[str]) -> int:
    from reprokit.replaying._replay import load_archive, replayed_outcome

    loaded = load_archive(
        path,
        TrustPolicy.from_argv(options),
        limits=limits_from_argv(options),
        config_overrides={"jax_enable_x64": True},
    )
    outcome = replayed_outcome(loaded, record=upcast_record(loaded.record))
    if outcome["exception"] is not None:
        print(
            f"raised {outcome['exception']['type']}: {outcome['exception']['message']}",
            file=sys.stderr,
        )
        return 1
    leaves = _compared(outcome)  # already named: the reference's "output" holds them all
    arrays = {f"leaf{i}": np.asarray(a, dtype=np.float64) for i, (_, a) in enumerate(leaves)}
    np.savez(target, paths=np.array(json.dumps([p for p, _ in leaves])), **arrays)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) >= 3 and args[1] == "x64-outputs":
        sys.exit(_x64_outputs_main(args[0], args[2], args[3:]))
    sys.exit(_worker_main(args))
