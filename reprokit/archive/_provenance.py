"""How an archive was made, said in the same few lines by `run`, `inspect` and the issue text.

The manifest's `found_by` records how the layer was found (find's check and
rule, the reference, the error against the tolerance applied; watch's model
call) and `selfcheck.json` what the replay in a fresh process measured after
packing, the other mode included ("captured jit; eager replay differs, max
abs error 1.31, does not reproduce"). A maintainer deciding whether to trust
a report needs both, and they used to live only in those two files.

Both come from an archive, so both are hostile: only numbers, booleans and
words from short fixed lists are printed; the one free-form string (the
reference's name) passes through `printable` and is cut short.
"""

from __future__ import annotations

import math
import re
from typing import Any

from reprokit.archive import _format

_CHECKS = ("nonfinite", "exception", "mismatch", "inf")
_MODES = ("eager", "jit")
_DTYPE = re.compile(r"[a-z][a-z0-9_]{0,30}")
_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,200}")


def _number(value: Any) -> float | None:
    if value == "inf":  # how JSON-safe manifests spell an infinite error
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _sci(value: float | None) -> str:
    if value is None:
        return "?"
    return "inf" if math.isinf(value) else f"{value:.2e}"


def read_self_check(data: dict) -> dict:
    """The fields of a `selfcheck.json` that are shown, each checked for its type; others dropped."""
    kept: dict[str, Any] = {
        k: data[k]
        for k in ("ran", "reproduced", "output_bitwise_equal")
        if isinstance(data.get(k), bool)
    }
    if data.get("signature_kind") in _format.SIGNATURE_KINDS:
        kept["signature_kind"] = data["signature_kind"]
    other = data.get("other_mode")
    if isinstance(other, dict) and other.get("mode") in _MODES:
        shown = {"mode": other["mode"]}
        for key in ("ran", "reproduced", "same_as_recorded_mode"):
            if isinstance(other.get(key), bool):
                shown[key] = other[key]
        error = _number(other.get("max_abs_error"))
        if error is not None:
            shown["max_abs_error"] = error
        kept["other_mode"] = shown
    return kept


def self_check_lines(self_check: dict | None, manifest: dict) -> list[str]:
    """What the reporter's self-check measured, or nothing when the archive holds none."""
    if not isinstance(self_check, dict):
        return []
    if not self_check.get("ran"):
        return ["reproduced on the reporter's machine after packing: not checked"]
    kind = self_check.get("signature_kind") or manifest["signature"]["kind"]
    answer = "yes" if self_check.get("reproduced") else "NO"
    if kind == "exception":
        detail = ", the same exception" if self_check.get("reproduced") else ""
    elif self_check.get("output_bitwise_equal"):
        detail = ", output bitwise equal"
    else:
        detail = ", output not bitwise equal"
    lines = [f"reproduced on the reporter's machine after packing: {answer}{detail}"]
    other = self_check.get("other_mode")
    mode = manifest.get("mode") if manifest.get("mode") in _MODES else "?"
    if isinstance(other, dict) and other.get("ran"):
        if other.get("same_as_recorded_mode"):
            lines.append(f"  captured {mode}; {other['mode']} replay gives the same outcome")
        else:
            error = other.get("max_abs_error")
            differs = f"differs, max abs error {error:.3g}" if error is not None else "differs"
            verdict = "still reproduces" if other.get("reproduced") else "does not reproduce"
            lines.append(f"  captured {mode}; {other['mode']} replay {differs}, {verdict}")
    return lines


def found_by_lines(manifest: dict) -> list[str]:
    """How the layer was chosen: by find (check, rule, reference, error vs tolerance), by watch,
    or by the reporter's own selection."""
    found = manifest.get("found_by")
    if not isinstance(found, dict):
        return ["found by: the reporter's own selection (reprokit pack)"]
    check = found.get("check") if found.get("check") in _CHECKS else "?"
    watch = found.get("watch")
    if isinstance(watch, dict):
        step = _count(watch.get("model_call"))
        where = f" at model call {step}" if step is not None else ""
        head = f"found by: reprokit watch, check={check}{where}"
    else:
        head = f"found by: reprokit find, check={check}"
    rule = found.get("rule")
    if rule == "nan":
        head += " (followed the NaN to the layer that made it)"
    elif rule == "nonfinite" and check == "inf":
        head += " (first layer returning NaN/Inf)"
    lines = [head]
    producers = found.get("inf_producers")
    if isinstance(producers, list) and producers:
        first = producers[0] if isinstance(producers[0], dict) else {}
        name = first.get("type") if isinstance(first.get("type"), str) else ""
        name = name.rsplit(".", 1)[-1] if _TYPE.fullmatch(name) else "a layer"
        infs = (_count(first.get("posinf")) or 0) + (_count(first.get("neginf")) or 0)
        lines.append(
            f"  before it: {name} produced {infs} ±Inf from finite inputs"
            + (f" (and {len(producers) - 1} more layer(s))" if len(producers) > 1 else "")
            + "; NaN came later"
        )
    if check == "mismatch":
        reference = found.get("reference")
        if isinstance(reference, str):
            lines.append(f"  reference: {_format.printable(reference)[:120]}")
        error = found.get("error") if isinstance(found.get("error"), dict) else {}
        rel, absolute = _number(error.get("rel")), _number(error.get("abs"))
        tolerance = _number(found.get("tolerance"))
        dtype = found.get("tolerance_dtype")
        dtype = dtype if isinstance(dtype, str) and _DTYPE.fullmatch(dtype) else None
        if rel is None:  # archives from before the metric had its name
            returned = found.get("returned") if isinstance(found.get("returned"), dict) else {}
            rel = _number(returned.get("error"))
        lines.append(
            f"  error: rel {_sci(rel)}"
            + (f", abs {_sci(absolute)}" if absolute is not None else "")
            + f" vs tolerance rel {_sci(tolerance)}"
            + (f" ({dtype})" if dtype else "")
            + " (rel = max|x - ref| / max|ref|)"
        )
    return lines
