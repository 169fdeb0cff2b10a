"""What a replay measured, and whether that is the bug the reporter recorded.

A verdict must be honest: it is computed only from what was measured (the
recorded outcome and the replayed one), never assumed. Both `reprokit run`
and the standalone `replay.py` use this module, so they cannot disagree:
its source is embedded verbatim into the generated script. It therefore
imports nothing but numpy and ml_dtypes, and works on plain dicts and numpy arrays.

An outcome is a dict::

    {"exception": {"type": "builtins.ValueError", "message": "..."} or None,
     "output": [(leaf_path, numpy_array), ...],
     "state": [(variable_label, numpy_array), ...]}
"""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np

# Equal to `reprokit.archive._format.SIGNATURE_KINDS` (the manifest schema); a
# copy because replay.py embeds this file without reprokit. A test checks.
SIGNATURE_KINDS = ("exception", "nonfinite", "output", "nonfinite_grad")
# reprokit's one error metric, in find, run, --reference, --sweep and every
# verdict: per leaf, abs = max |x - ref| and rel = abs / max |ref| (normwise,
# so values near zero do not blow it up); inf where only one side is
# non-finite. A tolerance is on rel. (`max_rel_error` in the JSON rows is the
# element-wise maximum, kept for scripts that read it; nothing decides on it.)
ERROR_METRIC = "abs = max|x - ref|; rel = abs / max|ref| (per leaf)"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,16}")
_PATH = re.compile(r"(?:<\w+>|~)?(?:/[^\s'\":,)]+)+")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def leaf_as_numpy(leaf: Any) -> np.ndarray:
    """A numpy view of an output leaf (arrays, PRNG keys as their key data, scalars)."""
    dtype = getattr(leaf, "dtype", None)
    # A key's dtype is jax's own extended dtype, never a numpy one (and
    # `str(dtype)` is slow enough to matter per leaf on records of 10,000 leaves).
    if dtype is not None and not isinstance(dtype, np.dtype) and "key<" in str(dtype):
        import jax

        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind in "fc" or array.dtype.name.startswith(("bfloat", "float8"))


# numpy's own floats up to float64: NaN and Inf are counted in the array's
# dtype, and an all-finite array (the common case) needs one pass, no copy.
_NATIVE_FLOATS = frozenset(np.dtype(name) for name in ("float16", "float32", "float64"))


def nonfinite_counts(array: np.ndarray) -> dict[str, int]:
    """NaN, +Inf and -Inf counts of an array (zeros for non-float dtypes)."""
    if array.dtype in _NATIVE_FLOATS:
        if array.size == 0 or np.isfinite(array).all():
            return {"nan": 0, "posinf": 0, "neginf": 0}
    elif not _is_float(array) or array.size == 0:
        return {"nan": 0, "posinf": 0, "neginf": 0}
    values = array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)
    parts = (values.real, values.imag) if array.dtype.kind == "c" else (values,)
    return {
        "nan": int(sum(np.isnan(p).sum() for p in parts)),
        "posinf": int(sum(np.isposinf(p).sum() for p in parts)),
        "neginf": int(sum(np.isneginf(p).sum() for p in parts)),
    }


def detect_signature(outcome: dict, kind: str | None = None) -> dict:
    """The recorded issue of an outcome: exception, non-finite leaves, or the output itself.

    `kind` overrides the automatic choice (exception beats non-finite beats
    output), and must be consistent with the outcome.
    """
    exception = outcome.get("exception")
    nonfinite = []
    for path, array in outcome.get("output") or []:
        counts = nonfinite_counts(array)
        if any(counts.values()):
            nonfinite.append({"path": path, **counts})
    if kind is None:
        kind = "exception" if exception else "nonfinite" if nonfinite else "output"
    if kind not in SIGNATURE_KINDS:
        raise ValueError(f"signature must be one of {', '.join(SIGNATURE_KINDS)}, not {kind!r}")
    if kind == "exception":
        if not exception:
            raise ValueError("signature 'exception' asked for, but the layer did not raise")
        return {"kind": "exception", "type": exception["type"], "message": exception["message"]}
    if exception:
        raise ValueError(
            f"the layer raised {exception['type']}; its signature can only be 'exception'"
        )
    if kind == "nonfinite":
        if not nonfinite:
            raise ValueError("signature 'nonfinite' asked for, but every output value is finite")
        return {"kind": "nonfinite", "leaves": nonfinite}
    if kind == "nonfinite_grad":
        bad = []
        for path, array in outcome.get("gradients") or []:
            counts = nonfinite_counts(array)
            if any(counts.values()):
                bad.append({"path": path, **counts})
        if not bad:
            raise ValueError(
                "signature 'nonfinite_grad' asked for, but every gradient of the layer is finite"
            )
        return {"kind": "nonfinite_grad", "leaves": bad}
    return {"kind": "output"}


def default_tolerance(dtype_name: str) -> float:
    """Relative tolerance for `output` signatures: a few units in the last place."""
    try:
        return float(4 * ml_dtypes.finfo(dtype_name).eps)
    except (TypeError, ValueError):
        return 0.0


def compare_leaves(recorded: list, replayed: list) -> list[dict]:
    """Per-leaf comparison: bitwise equality, else max abs/rel error and non-finite counts."""
    replayed_by_path = dict(replayed)
    rows = []
    for path, want in recorded:
        row: dict[str, Any] = {"path": path, "dtype": want.dtype.name, "shape": list(want.shape)}
        got = replayed_by_path.get(path)
        if got is None:
            row.update(status="missing", bitwise_equal=False)
        elif got.dtype != want.dtype or got.shape != want.shape:
            row.update(
                status="mismatch",
                bitwise_equal=False,
                replayed_dtype=got.dtype.name,
                replayed_shape=list(got.shape),
            )
        else:
            equal = want.tobytes() == got.tobytes()
            row.update(status="equal" if equal else "differs", bitwise_equal=equal)
            if not equal:
                row.update(_errors(want, got))
            row["nonfinite_recorded"] = nonfinite_counts(want)
            row["nonfinite_replayed"] = nonfinite_counts(got)
        rows.append(row)
    known = {path for path, _ in recorded}
    for path, _ in replayed:
        if path not in known:
            rows.append({"path": path, "status": "unexpected", "bitwise_equal": False})
    return rows


def _errors(want: np.ndarray, got: np.ndarray) -> dict:
    if want.dtype.kind == "b":
        return {
            "max_abs_error": float(np.sum(want != got)),
            "max_rel_error": None,
            "rel_error": None,
        }
    wide = np.complex128 if want.dtype.kind == "c" else np.float64
    a, b = want.astype(wide), got.astype(wide)
    same_nonfinite = (np.isnan(a) & np.isnan(b)) | (a == b)
    # inf - inf and NaN against a number have no finite distance: they count as
    # infinitely far apart (NaN would vanish from a max), and warn nobody.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        diff = np.where(same_nonfinite, 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        rel = np.where(same_nonfinite, 0.0, diff / np.abs(a))
    rel = np.where(np.isnan(rel), np.inf, rel)
    scale = float(np.max(np.abs(np.where(np.isfinite(a), a, 0)), initial=0.0))
    abs_error = float(np.max(diff, initial=0.0))
    return {
        "max_abs_error": abs_error,
        "rel_error": abs_error / max(scale, float(np.finfo(np.float64).tiny)),
        "max_rel_error": float(np.max(rel, initial=0.0)),
        "scale": scale,
    }


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float spelled "inf", "-inf" or "nan".

    Errors between outputs are often infinite; `json.dumps` would write them
    as `Infinity`/`NaN`, which are not JSON and which strict readers (jq,
    JavaScript, reprokit's own manifest reader) refuse.
    """
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def _normalize_message(message: str) -> str:
    # Recorded messages were scrubbed at pack time (paths, control characters),
    # so compare both sides in that same reduced form.
    text = _CONTROLS.sub("", " ".join(str(message).split()))
    return _PATH.sub("<path>", _ADDRESS.sub("0x…", text))


def _finite_again(rows: list[dict], leaves: list[dict]) -> list[str]:
    """Paths of recorded non-finite leaves that the replay found finite."""
    by_path = {row["path"]: row for row in rows}
    return [
        leaf["path"]
        for leaf in leaves
        if not any(by_path.get(leaf["path"], {}).get("nonfinite_replayed", {}).values())
    ]


def judge(signature: dict, recorded: dict, replayed: dict) -> dict:
    """Compares a replayed outcome with the recorded one and decides if the issue reproduced."""
    verdict: dict[str, Any] = {"signature": signature, "error_metric": ERROR_METRIC}
    exception = replayed.get("exception")
    verdict["replayed_exception"] = exception
    verdict["output"] = compare_leaves(recorded.get("output") or [], replayed.get("output") or [])
    verdict["state"] = compare_leaves(recorded.get("state") or [], replayed.get("state") or [])
    kind = signature["kind"]
    if kind == "nonfinite_grad":
        verdict["gradients"] = compare_leaves(
            recorded.get("gradients") or [], replayed.get("gradients") or []
        )
    if kind == "exception":
        if exception is None:
            reproduced, reason = False, "the layer returned normally; it raised before"
        elif exception["type"] != signature["type"]:
            reproduced = False
            reason = f"raised {exception['type']} instead of {signature['type']}"
        elif _normalize_message(exception["message"]) != _normalize_message(signature["message"]):
            reproduced = False
            reason = f"raised {exception['type']} with a different message"
        else:
            reproduced, reason = True, f"raised {exception['type']} with the same message"
    elif exception is not None:
        reproduced, reason = False, f"raised {exception['type']}: {exception['message']}"
    elif kind == "nonfinite":
        missing = _finite_again(verdict["output"], signature["leaves"])
        reproduced = not missing
        reason = (
            "non-finite values in "
            + ", ".join(leaf["path"] or "output" for leaf in signature["leaves"])
            if reproduced
            else "finite where it was non-finite: " + ", ".join(p or "output" for p in missing)
        )
    elif kind == "nonfinite_grad":
        missing = _finite_again(verdict["gradients"], signature["leaves"])
        reproduced = not missing
        reason = (
            "gradient issue: the layer's backward pass turned the recorded (finite) output "
            "cotangent into non-finite gradients in " + ", ".join(leaf["path"] for leaf in signature["leaves"])
            if reproduced
            else "gradient issue not reproduced: finite gradients where they were non-finite: "
            + ", ".join(missing)
        )
    else:
        for row in verdict["output"]:
            if row.get("dtype") is not None:
                row["tolerance"] = _tolerance(row, signature)
        off = [row for row in verdict["output"] if not _within_tolerance(row, signature)]
        reproduced = not off
        reason = (
            "output matches the recorded output"
            if reproduced
            else "output differs from the recorded output in "
            + ", ".join(row["path"] or "output" for row in off)
        )
    verdict["reproduced"] = reproduced
    verdict["reason"] = reason
    verdict["output_bitwise_equal"] = all(row["bitwise_equal"] for row in verdict["output"])
    verdict["state_bitwise_equal"] = all(row["bitwise_equal"] for row in verdict["state"])
    return verdict


def _tolerance(row: dict, signature: dict) -> dict:
    """The tolerance applied to one leaf: on rel, with the dtype it was derived from."""
    rtol = signature.get("rtol")
    if rtol is not None:
        return {"rel": float(rtol), "dtype": row["dtype"], "source": "recorded rtol"}
    return {"rel": default_tolerance(row["dtype"]), "dtype": row["dtype"], "source": "4 eps"}


def _within_tolerance(row: dict, signature: dict) -> bool:
    if row["bitwise_equal"]:
        return True
    if row["status"] != "differs" or row.get("rel_error") is None:
        return False
    return row["rel_error"] <= _tolerance(row, signature)["rel"]


def _describe_rows(title: str, rows: list[dict]) -> list[str]:
    if not rows:
        return [f"{title}: (none)"]
    if all(row["bitwise_equal"] for row in rows):
        return [f"{title}: bitwise equal to the recorded values ({len(rows)} leaves)"]
    lines = [f"{title}: differs from the recorded values"]
    for row in rows:
        path = row["path"] or "(root)"
        if row["bitwise_equal"]:
            lines.append(f"  {path}: bitwise equal")
        elif row["status"] == "differs":
            rel = row.get("rel_error")
            rel_text = "n/a" if rel is None else f"{rel:.3g}"
            tolerance = row.get("tolerance")
            limit = (
                f" (tolerance rel {tolerance['rel']:.3g}, {tolerance['dtype']} {tolerance['source']})"
                if tolerance
                else ""
            )
            lines.append(f"  {path}: error abs {row['max_abs_error']:.3g}, rel {rel_text}{limit}")
        else:
            lines.append(f"  {path}: {row['status']}")
    return lines


def format_verdict(verdict: dict) -> str:
    """Human-readable verdict: the decision first, then what was measured."""
    signature = verdict["signature"]
    head = "REPRODUCED" if verdict["reproduced"] else "NOT REPRODUCED"
    if signature["kind"] == "exception":
        recorded = f"{signature['type']}: {signature['message']}"
    elif signature["kind"] == "nonfinite":
        recorded = "non-finite output in " + ", ".join(
            f"{leaf['path'] or 'output'} ({leaf['nan']} NaN, {leaf['posinf'] + leaf['neginf']} Inf)"
            for leaf in signature["leaves"]
        )
    elif signature["kind"] == "nonfinite_grad":
        recorded = "non-finite gradients (finite forward pass) in " + ", ".join(
            f"{leaf['path']} ({leaf['nan']} NaN, {leaf['posinf'] + leaf['neginf']} Inf)"
            for leaf in signature["leaves"]
        )
    else:
        recorded = "the recorded output values"
    lines = [f"{head}: {verdict['reason']}", f"  recorded issue: {recorded}"]
    if verdict.get("replayed_exception") is None or signature["kind"] != "exception":
        lines += ["  " + line for line in _describe_rows("output", verdict["output"])]
        lines += ["  " + line for line in _describe_rows("final state", verdict["state"])]
    if "gradients" in verdict:
        lines += ["  " + line for line in _describe_rows("gradients", verdict["gradients"])]
    return "\n".join(lines)
