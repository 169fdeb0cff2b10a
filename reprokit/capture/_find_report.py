"""How a search is described: the printed layer tree and the `found_by` facts.

What `find` measured reaches people twice: as the report printed for the
reporter (the layer tree, each layer's status, the culprit marked, or why
none was found) and as the `found_by` entry packed archives record. Both
are built here from the instrumented pass and the chosen culprit, so the
search itself stays free of formatting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reprokit.capture._culprit import (
    _bad,
    _block_of,
    _Culprit,
    _misbehaves,
    _nonfinite_parameters,
    _representative,
    _tolerance,
)
from reprokit.capture._probe import _Call, _Session
from reprokit.environment._scrub import scrub_text
from reprokit.portable._verdict import ERROR_METRIC
from reprokit.record import _flax

# Above this many layers the report folds subtrees away from the culprit.
_FULL_REPORT_LAYERS = 400


def _counts_text(summary: dict | None) -> str:
    if summary is None:
        return "-"
    parts = [
        f"{summary[key]} {name}"
        for key, name in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
        if summary[key]
    ]
    return ", ".join(parts) if parts else "finite"


def _status_text(summary: dict | None, check: str) -> str:
    if summary is None:
        return "-"
    if check != "mismatch":
        return _counts_text(summary)
    error = summary.get("error")
    text = "rel err ?" if error is None else f"rel err {error:.1e}"
    return text if not _bad(summary) else f"{text}, {_counts_text(summary)}"


def _render(
    session: _Session,
    culprit: _Culprit | None,
    header: list[str],
    tolerance,
) -> str:
    sites = session.sites
    by_site: dict[int, list[_Call]] = {}
    for call in session.calls:
        by_site.setdefault(call.site, []).append(call)
    chain: set[int] = set()
    site = culprit.site if culprit else None
    while site is not None:
        chain.add(site)
        site = sites[site].parent
    if len(sites) <= _FULL_REPORT_LAYERS:
        shown = set(range(len(sites)))
    else:
        shown = {s.index for s in sites if s.depth <= 1 or s.index in chain or s.parent in chain}
    rows = []
    for s in sites:
        if s.index not in shown:
            continue
        flax = _flax_path(session, s)
        # A layer of penzai's Flax bridge is named as Flax names it.
        type_name = f"flax {flax}" if flax else s.type_name
        name = ("  " * s.depth) + (f"{s.segment}: {type_name}" if s.segment else type_name)
        calls = by_site.get(s.index, [])
        if not calls:
            # Called only while jit traced the model (which then raised), or never.
            in_text, marks = "", []
            out_text = "traced, not run" if session.python_counts[s.index] else "not called"
            if culprit is not None and culprit.site == s.index and culprit.exception:
                out_text = f"raised {culprit.exception['type'].rsplit('.', 1)[-1]} (tracing)"
        else:
            call = _representative(calls, session.check, tolerance, culprit)
            in_text = _status_text(call.received, session.check)
            if call.exception is not None:
                out_text = f"raised {call.exception['type'].rsplit('.', 1)[-1]}"
            elif call.returned is None:
                out_text = "did not return"
            else:
                out_text = _status_text(call.returned, session.check)
                if session.check == "mismatch":
                    # The limit this layer is held to (it depends on its dtype).
                    limit, dtype = _tolerance(call, tolerance), _tolerance_dtype(call)
                    out_text += f" (tol {limit:.1e}" + (f" {dtype})" if dtype else ")")
            marks = [f"call {call.index + 1} of {len(calls)}"] if len(calls) > 1 else []
        if culprit is not None and s.index == culprit.site:
            marks.append("<== CULPRIT")
        elif s.index in chain:
            marks.append("(contains the culprit)")
        rows.append((name, in_text, out_text, "  ".join(marks)))
    rows = _collapse_not_called(rows)
    width = min(max((len(r[0]) for r in rows), default=0), 72)
    in_width = min(max((len(r[1]) for r in rows), default=0), 26)
    out_width = min(max((len(r[2]) for r in rows), default=0), 26)
    lines = list(header)
    lines.append("")
    rows.insert(0, ("layer", "received", "returned", ""))
    for name, in_text, out_text, marks in rows:
        line = f"{name:<{width}}  {in_text:<{in_width}}  {out_text:<{out_width}}  {marks}"
        lines.append(line.rstrip())
    hidden = len(sites) - len(shown)
    if hidden:
        lines.append(f"({hidden} layers away from the culprit not shown)")
    return "\n".join(lines)


# Runs of this many "not called" rows or more print as one line.
_NOT_CALLED_RUN = 3


def _collapse_not_called(rows: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
    """Folds each run of unmarked "not called" layers (a model's unused branches) into one row."""
    out: list[tuple[str, str, str, str]] = []
    run: list[tuple[str, str, str, str]] = []

    def flush() -> None:
        if len(run) >= _NOT_CALLED_RUN:
            indent = run[0][0][: len(run[0][0]) - len(run[0][0].lstrip())]
            out.append((f"{indent}... {len(run)} layers", "", "not called", ""))
        else:
            out.extend(run)
        run.clear()

    for row in rows:
        if row[2] == "not called" and not row[3]:
            run.append(row)
        else:
            flush()
            out.append(row)
    flush()
    return out


def _flax_path(session: _Session, site) -> str | None:
    """`Encoder/LayerNorm_0` for a layer of penzai's unflaxify bridge, else None."""
    return _flax.flax_path(session.sites[0].layer, site.keypath) if session.sites else None


def _header(
    session: _Session,
    culprit: _Culprit | None,
    check: str,
    passes: int,
    found_by: dict,
    reference_name: str | None,
) -> list[str]:
    what = f"{passes} instrumented pass" + ("es (model + reference)" if passes > 1 else "")
    lines = [
        f"reprokit find: check={check}, {what}, {len(session.sites)} layers, "
        f"{len(session.calls)} calls"
    ]
    if reference_name:
        lines.append(f"  reference: {reference_name}")
    if culprit is None:
        return lines
    site = session.sites[culprit.site]
    flax = _flax_path(session, site)
    lines.append(
        f"culprit: {site.keystr or '(the whole model)'}"
        + (f" (Flax module {flax})" if flax else "")
    )
    where = f"call {culprit.call_index + 1} of {found_by['call_count']}"
    if found_by.get("block") is not None:
        axis, size = site.stack_axes[-1]
        where += f"; LayerStack axis {axis!r} block {found_by['block']} of {size}"
    if culprit.while_tracing:
        where += "; raised while jit/scan traced the model"
    lines.append(f"  type: {site.layer_type} ({where})")
    call = culprit.call
    if check == "exception":
        exc = culprit.exception or {}
        lines.append(f"  raised: {exc.get('type')}: {exc.get('message')}")
    elif call is not None:
        lines.append(f"  received: {_status_text(call.received, check)}")
        lines.append(f"  returned: {_status_text(call.returned, check)}")
        lines.extend(_nan_story(session, culprit))
        if check == "mismatch":
            error = found_by.get("error") or {}
            if error.get("abs") is not None:
                lines.append(
                    f"  error: abs {error['abs']:.2e}, rel {error['rel']:.2e} "
                    "(abs = max|x - ref|, rel = abs / max|ref|, worst leaf)"
                )
            lines.append(
                f"  tolerance: rel {found_by['tolerance']:.2e}, applied to this layer "
                f"({found_by.get('tolerance_rule', 'given')})"
            )
    for param in found_by.get("nonfinite_parameters", []):
        lines.append(f"  non-finite parameter: {param['label']} ({_counts_text(param)})")
    inner = found_by.get("sublayer_calls")
    if inner:
        behaved = "ran without raising" if check == "exception" else "behaved"
        lines.append(
            f"  inside it: {inner} sublayer call(s), each of which {behaved}; none of them "
            "alone shows the issue, so this is the smallest layer that does"
        )
    also = found_by.get("also_misbehaved") or []
    if also:
        lines.append(
            f"  ruled out: {len(also)} enclosing layer(s) that misbehave only because they "
            "contain it (the smallest misbehaving layer is kept)"
        )
    return lines


def _nan_story(session: _Session, culprit: _Culprit) -> list[str]:
    """How the NaN came about: the ±Inf producers before the culprit, then the culprit."""
    if culprit.rule is None:
        return []
    lines = []
    if culprit.rule == "nan":
        lines.append(
            "  rule: followed the NaN (NaN is never intentional; ±Inf often is, e.g. a mask's "
            "-inf); check='inf' blames the first layer returning ±Inf instead"
        )
    for call in culprit.inf_producers[:5]:
        site = session.sites[call.site]
        lines.append(
            f"  context: {site.type_name} at {site.keystr or '(the whole model)'} produced "
            f"{_counts_text(call.returned)} from finite inputs"
        )
    if len(culprit.inf_producers) > 5:
        lines.append(f"  context: {len(culprit.inf_producers) - 5} more ±Inf producer(s)")
    if culprit.inf_producers and culprit.call is not None and culprit.call.returned:
        site = session.sites[culprit.site]
        lines.append(
            f"  then: {site.type_name} turned them into {culprit.call.returned['nan']} NaN "
            "<== culprit"
        )
    return lines


def _tolerance_dtype(call: _Call) -> str | None:
    """The dtype the default tolerance of a call was derived from (its largest eps)."""
    sides = [s for s in (call.received, call.returned) if s and s.get("dtype")]
    return max(sides, key=lambda s: s.get("eps", 0.0))["dtype"] if sides else None


def _jsonable(summary: dict) -> dict:
    # JSON has no inf/nan; manifests stay standard JSON.
    return {
        k: (repr(v) if isinstance(v, float) and not np.isfinite(v) else v)
        for k, v in summary.items()
    }


def _found_by(session, culprit, check, mode, passes, reference_name, tolerance) -> dict:
    site = session.sites[culprit.site]
    count = session.counts[culprit.site] or session.python_counts[culprit.site]
    block = _block_of(culprit.call, session.sites)
    found_by: dict[str, Any] = {
        "check": check,
        "mode": mode or "as the model runs",
        "call_index": culprit.call_index,
        "call_count": count,
        "block": block,
        "layers_instrumented": len(session.sites),
        "calls_seen": len(session.calls),
        "passes": passes,
    }
    if culprit.call is not None and check != "exception":
        found_by["received"] = _jsonable(culprit.call.received)
        found_by["returned"] = _jsonable(culprit.call.returned)
    if check == "exception":
        exc = culprit.exception or {}
        found_by["exception"] = {
            "type": exc.get("type"),
            "message": scrub_text(str(exc.get("message"))),
        }
        found_by["while_tracing"] = culprit.while_tracing
    if check == "mismatch":
        found_by["reference"] = reference_name
        found_by["tolerance"] = _tolerance(culprit.call, tolerance)
        found_by["tolerance_dtype"] = _tolerance_dtype(culprit.call)
        found_by["tolerance_rule"] = (
            "given"
            if tolerance is not None
            else f"{found_by['tolerance_dtype']}: max(1e-3, 16 eps)"
        )
        found_by["error_metric"] = ERROR_METRIC
        returned = culprit.call.returned or {}
        found_by["error"] = _jsonable(
            {"abs": returned.get("abs_error"), "rel": returned.get("error")}
        )
    if check in ("nonfinite", "inf"):
        found_by["nonfinite_parameters"] = _nonfinite_parameters(site, block)
        found_by["rule"] = culprit.rule
        found_by["inf_producers"] = [
            {
                "keypath": session.sites[call.site].keystr or "(the whole model)",
                "type": session.sites[call.site].layer_type,
                "posinf": call.returned["posinf"],
                "neginf": call.returned["neginf"],
            }
            for call in culprit.inf_producers
        ]
    also = []
    call = culprit.call.parent if culprit.call is not None else None
    while call is not None:
        if check == "exception" or _misbehaves(call, check, tolerance):
            also.append(session.sites[call.site].keystr or "(the whole model)")
        call = call.parent
    found_by["also_misbehaved"] = also
    # What makes it the smallest: every call made inside it behaved, so none of
    # those sublayers, replayed alone on what it received, shows the issue.
    if culprit.call is not None:
        found_by["sublayer_calls"] = sum(call.parent is culprit.call for call in session.calls)
    return found_by


def _not_found_message(session: _Session, error, check: str, tolerance) -> str:
    if check == "exception":
        if error is None:
            return "the model ran without raising; check='exception' needs a call that raises"
        return (
            f"the model raised {type(error).__name__} outside any layer's own code (e.g. an "
            "XLA runtime error, raised when a compiled model runs); rerun with mode='eager' "
            "to locate it"
        )
    roots = [call for call in session.calls if call.parent is None]
    if check in ("nonfinite", "inf"):
        if any(_bad(call.received) for call in roots):
            return (
                "the model's own inputs (argument, side inputs or state) already hold NaN/Inf; "
                "no layer introduced them"
            )
        suffix = f"; it also raised {type(error).__name__}" if error is not None else ""
        return (
            "no layer returned NaN/Inf from finite inputs (check='nonfinite')"
            + suffix
            + "; try check='exception' or check='mismatch'"
        )
    worst = max(
        (c for c in session.returned if c.returned and c.returned.get("error") is not None),
        key=lambda c: c.returned["error"],
        default=None,
    )
    detail = ""
    if worst is not None:
        detail = (
            f" (largest output error {worst.returned['error']:.1e} at "
            f"{session.sites[worst.site].keystr or 'the whole model'})"
        )
    limit = "the default tolerance" if tolerance is None else f"tolerance {tolerance:g}"
    return f"no layer's output differs from the reference by more than {limit}{detail}"
