"""Redaction of private values, and fitting an archive under a size limit.

"I can't attach this: the weights are confidential, or the file is too big"
is the second reason bug reports never get a repro. Both are solved by
replacing array values with stand-ins and checking, by actually calling the
layer, that the recorded issue survives:

* `--redact params=random|zeros|shapes`, `--redact inputs=random|...`
  replaces parameter and/or input values with random arrays matched to each
  array's dtype, shape and statistics (or zeros; `shapes` keeps nothing but
  the shapes). If the issue is lost, weaker redactions are tried in order:
  each parameter restored in turn, then the inputs restored.
* `--max-size 25MB` compresses array members where that pays, then zeroes the
  largest arrays the issue does not need, and refuses with a clear message if
  nothing fits.

Every change is recorded in the manifest, so archive and README say plainly
what was redacted.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any

import numpy as np

from reprokit._errors import CaptureError, UsageError
from reprokit.archive._container import Limits

TARGETS = ("params", "inputs")
KINDS = ("random", "zeros", "shapes")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
ARCHIVE_OVERHEAD = 256 * 1024  # manifest, structure, replay.py, README, StableHLO: generous


def parse_redactions(specs: Any) -> dict[str, str]:
    """`["params=random", "inputs=zeros"]` or a dict -> {"params": "random", ...}."""
    if not specs:
        return {}
    items = specs.items() if isinstance(specs, dict) else (s.partition("=")[::2] for s in specs)
    out = {}
    for target, kind in items:
        if target not in TARGETS or kind not in KINDS:
            raise UsageError(
                f"redaction {target}={kind} is not understood; use params=random|zeros|shapes "
                "or inputs=random|zeros|shapes"
            )
        out[target] = kind
    return out


def parse_size(text: str | int | None) -> int | None:
    """'25MB' -> 25_000_000; '1GiB' -> 2**30; an int is bytes."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"size {text!r} is not understood; write e.g. 25MB or 100MiB")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


# ------------------------------------------------------------------ stand-in values


def stand_in(leaf: Any, kind: str, rng: np.random.Generator) -> Any:
    """An array like `leaf` (dtype, shape, weak type) holding redacted values."""
    import jax

    if not isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return leaf
    values = np.asarray(leaf)
    if kind in ("zeros", "shapes"):
        new = np.zeros_like(values)
    elif values.dtype.kind == "b":
        new = rng.random(values.shape) < (values.mean() if values.size else 0.5)
    elif values.dtype.kind in "iu":
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        new = rng.integers(low, high + 1, size=values.shape, dtype=np.int64).astype(values.dtype)
    else:
        wide = values.astype(np.float64)
        finite = wide[np.isfinite(wide)]
        mean, std = (finite.mean(), finite.std()) if finite.size else (0.0, 1.0)
        new = rng.normal(mean, std, size=values.shape).astype(values.dtype)
    array = jax.device_put(new)
    if leaf.weak_type:
        from reprokit.portable._arrays import _as_weak_type

        array = _as_weak_type(array)
    return array


def _replace_leaves(tree: Any, kind: str, rng) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda leaf: stand_in(leaf, kind, rng), tree)


def _param_labels(submodel: Any) -> list[str]:
    from penzai import pz

    return [p.label for p in pz.select(submodel).at_instances_of(pz.ParameterValue).get_sequence()]


def _with_params(submodel: Any, kind: str, keep: set, seed: int) -> Any:
    from penzai import pz

    rng = np.random.default_rng(seed)

    def swap(param):
        if param.label in keep:
            return param
        return dataclasses.replace(param, value=_replace_leaves(param.value, kind, rng))

    return pz.select(submodel).at_instances_of(pz.ParameterValue).apply(swap)


def _recall(record, mode: str, **changes):
    """The record with some parts replaced and its outcome recomputed by calling the layer."""
    from reprokit.portable._calling import call_layer, exception_info

    new = dataclasses.replace(record, output=None, final_var_values=None, exception=None, **changes)
    try:
        output, final = call_layer(
            new.submodel, new.initial_var_values, new.argument, new.side_inputs, mode
        )
    except Exception as error:
        return dataclasses.replace(new, exception=exception_info(error))
    return dataclasses.replace(new, output=output, final_var_values=tuple(final))


def still_reproduces(signature: dict, record) -> bool | None:
    """Whether `record` still shows the recorded issue (None for `output`, which has no test)."""
    from reprokit.portable._verdict import detect_signature

    if signature["kind"] == "output":
        return None
    try:
        found = detect_signature(record.outcome, signature["kind"])
    except ValueError:
        return False
    return signature["kind"] != "exception" or found["type"] == signature["type"]


def redact(record, signature: dict, spec: dict[str, str], mode: str, seed: int = 0):
    """Redacts `record` per `spec`, weakening until the issue reproduces; returns (record, report)."""
    params_kind, inputs_kind = spec.get("params"), spec.get("inputs")
    labels = _param_labels(record.submodel) if params_kind else []

    def attempt(keep: set, redact_inputs: bool):
        changes = {}
        if params_kind:
            changes["submodel"] = _with_params(record.submodel, params_kind, keep, seed)
        if inputs_kind and redact_inputs:
            rng = np.random.default_rng(seed + 1)
            changes["argument"] = _replace_leaves(record.argument, inputs_kind, rng)
            changes["side_inputs"] = _replace_leaves(record.side_inputs, inputs_kind, rng)
        return _recall(record, mode, **changes)

    tried = []
    candidate = attempt(set(), True)
    kept: list[str] = []
    inputs_kept = False
    reproduces = still_reproduces(signature, candidate)
    tried.append("everything redacted")
    if reproduces is False and labels:
        for label in labels:
            trial = attempt({label}, True)
            tried.append(f"parameter {label} kept")
            if still_reproduces(signature, trial):
                candidate, kept, reproduces = trial, [label], True
                break
    if reproduces is False and inputs_kind:
        trial = attempt(set(), False)
        tried.append("inputs kept")
        if still_reproduces(signature, trial):
            candidate, inputs_kept, reproduces = trial, True, True
    report = {
        "params": params_kind,
        "inputs": None if inputs_kept else inputs_kind,
        "kept_parameters": kept,
        "parameters_redacted": len(labels) - len(kept),
        "reproduces": reproduces,
        "tried": tried,
    }
    return candidate, report


def describe(report: dict) -> list[str]:
    """Summary lines saying plainly what was redacted and whether the issue survived."""
    parts = []
    if report.get("params"):
        parts.append(f"{report['parameters_redacted']} parameters replaced ({report['params']})")
    if report.get("inputs"):
        parts.append(f"inputs replaced ({report['inputs']})")
    lines = ["  redacted: " + (", ".join(parts) or "nothing")]
    if report.get("kept_parameters"):
        lines.append(
            "  kept real values of "
            + ", ".join(report["kept_parameters"])
            + " (the issue needs them)"
        )
    if report.get("reproduces") is False:
        lines.append(
            "  WARNING: the issue does NOT reproduce with redacted values: it needs the exact "
            "values (tried: " + "; ".join(report.get("tried", [])) + ")"
        )
    elif report.get("reproduces") is None:
        lines.append("  note: an 'output' signature cannot be checked after redaction")
    return lines


# ------------------------------------------------------------------ size fitting


def compressed_size(data: np.ndarray) -> int:
    """Size of `data` deflated at a fast level (what the archive would store)."""
    return len(zlib.compress(memoryview(data.reshape(-1).view(np.uint8)), 1))


def fit(record, signature: dict, mode: str, max_size: int, encode) -> tuple[Any, dict]:
    """Compresses, then zeroes the largest arrays the issue does not need, until the archive fits.

    `encode(record)` returns (tree, arrays) as the writer would store them.
    Returns (record, plan) where plan["compress"] lists array indices to
    deflate; raises CaptureError with what would fit when nothing does.
    """
    tree, arrays = encode(record)
    plan = compression_plan(arrays)
    if plan["estimated_size"] <= max_size:
        return record, plan
    zeroed: list[str] = []
    from penzai import pz

    params = pz.select(record.submodel).at_instances_of(pz.ParameterValue).get_sequence()
    by_size = sorted(params, key=lambda p: -_nbytes(p.value))
    for param in by_size:
        trial = _recall(
            record,
            mode,
            submodel=_with_params(record.submodel, "zeros", _labels_except(params, param), 0),
        )
        if still_reproduces(signature, trial) is False:
            continue
        record = trial
        zeroed.append(param.label)
        tree, arrays = encode(record)
        plan = compression_plan(arrays)
        if plan["estimated_size"] <= max_size:
            plan["zeroed_parameters"] = zeroed
            return record, plan
    raise CaptureError(
        f"the archive would be about {plan['estimated_size'] / 1e6:.1f} MB even compressed and with "
        f"{len(zeroed)} unneeded parameters zeroed, over --max-size {max_size / 1e6:.1f} MB; "
        "select a smaller layer, or use --redact params=shapes if the issue does not need the values"
    )


def _labels_except(params, param) -> set:
    return {p.label for p in params if p.label != param.label}


def _nbytes(tree) -> int:
    import jax

    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree))


def compression_plan(arrays: list[np.ndarray]) -> dict:
    """Which array payloads to deflate ("compress": indices) and the archive's estimated size.

    A payload is deflated when that saves a tenth of it and stays within the
    reader's zip-bomb ratio; None payloads (fills) cost nothing.
    """
    compress, total = [], ARCHIVE_OVERHEAD
    for index, data in enumerate(arrays):
        if data is None:
            continue  # a fill (all zeros, or one element repeated): no payload at all
        size = data.nbytes
        if size >= 4096:
            packed = compressed_size(data)
            # The writer stores members that would pass the reader's zip-bomb ratio.
            if packed < 0.9 * size and size <= Limits.max_compression_ratio * packed:
                compress.append(index)
                size = packed
        total += size
    return {"compress": compress, "estimated_size": total}
