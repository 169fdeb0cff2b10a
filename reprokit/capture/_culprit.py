"""Which call of the instrumented pass is the culprit, and what else is known about it.

The culprit is the first call, in the order calls *return*, that misbehaves
while its inputs were well-behaved. A call returns after all of its
sublayer calls, so that call has no misbehaving descendant (it is the
innermost), and among disjoint candidates the first to return is also the
first to start: the rule is deterministic and needs one pass. Composite
layers that contain the culprit misbehave too; the report lists them as
what was ruled out in favour of the smallest layer.

The rule lives apart from the probes so that what "misbehaves" means
(non-finite from finite, an error above tolerance from inputs within it)
is stated once, for the search and for its report alike.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from penzai import pz

from reprokit.capture._probe import _Call, _Session, _Site
from reprokit.portable._calling import exception_info
from reprokit.portable._verdict import nonfinite_counts

# Below float32 round-off amplified through a small network (~1e-6 measured
# on the test models) and above a bf16 rounding step (~4e-3).
DEFAULT_TOLERANCE = 1e-3
# Low-precision calls are held to a few units of their own dtype instead.
_TOLERANCE_ULPS = 16


def _bad(summary: dict | None) -> int:
    if summary is None:
        return 0
    return summary["nan"] + summary["posinf"] + summary["neginf"]


def _tolerance(call: _Call, tolerance: float | None) -> float:
    if tolerance is not None:
        return tolerance
    eps = max((call.received or {}).get("eps", 0.0), (call.returned or {}).get("eps", 0.0))
    return max(DEFAULT_TOLERANCE, _TOLERANCE_ULPS * eps)


def _misbehaves(call: _Call, check: str, tolerance: float | None) -> bool:
    """The culprit test: bad output from well-behaved inputs.

    "nonfinite" and "inf": NaN/Inf out of finite inputs; "nan": NaN out of
    NaN-free inputs (±Inf in is fine: a mask's -inf is by design).
    """
    if call.received is None or call.returned is None:
        return False
    if check in ("nonfinite", "inf"):
        return _bad(call.received) == 0 and _bad(call.returned) > 0
    if check == "nan":
        return call.received["nan"] == 0 and call.returned["nan"] > 0
    if check == "mismatch":
        error_in, error_out = call.received.get("error"), call.returned.get("error")
        if error_in is None or error_out is None:
            return False
        limit = _tolerance(call, tolerance)
        return error_in <= limit < error_out
    return False


@dataclasses.dataclass(frozen=True)
class _Culprit:
    site: int
    call_index: int
    call: _Call | None
    while_tracing: bool = False
    exception: dict | None = None
    # For the non-finite checks: "nan" (the NaN was followed) or "nonfinite"
    # (the first NaN/Inf out of finite inputs), and the ±Inf producers that ran
    # before the culprit (context: a mask's -inf that a Softmax turned into NaN).
    rule: str | None = None
    inf_producers: tuple[_Call, ...] = ()


def _find_culprit(session: _Session, error: BaseException | None, tolerance) -> _Culprit | None:
    if session.check == "exception":
        seen = error
        while seen is not None:
            found = session.raised.get(id(seen))
            if found is not None:
                site, python_index, host_call = found
                info = exception_info(seen)
                if host_call is not None:
                    return _Culprit(site, host_call.index, host_call, exception=info)
                return _Culprit(site, python_index, None, while_tracing=True, exception=info)
            seen = seen.__cause__ or seen.__context__
        return None
    if session.check in ("nonfinite", "inf"):
        return _nonfinite_culprit(session)
    for call in session.returned:
        if _misbehaves(call, session.check, tolerance):
            return _Culprit(call.site, call.index, call)
    return None


def _model_returned_nan(session: _Session) -> bool:
    return any(
        call.returned is not None and call.returned["nan"] > 0
        for call in session.calls
        if call.parent is None
    )


def _nonfinite_culprit(session: _Session) -> _Culprit | None:
    """Which layer is blamed for non-finite values (check "nonfinite" or "inf").

    NaN is never intentional; ±Inf often is (a causal mask's -inf, -inf logits
    for banned tokens). So when the model's output holds NaN, check="nonfinite"
    follows the NaN: the culprit is the innermost layer that returned NaN from
    NaN-free inputs (a Softmax over a fully masked row), or, before it, a
    layer that returned NaN/Inf from finite inputs because its own parameters
    hold NaN/Inf (a corrupted checkpoint is never by design). Otherwise, and
    always with check="inf", the culprit is the first layer that returned
    NaN/Inf from finite inputs, intentional -inf included. The ±Inf producers
    that returned before the culprit are kept as context for the report.
    """
    follow_nan = session.check == "nonfinite" and _model_returned_nan(session)
    producers: list[_Call] = []
    corrupted: dict[int, bool] = {}
    for call in session.returned:
        if not _misbehaves(call, "nonfinite", None):
            if follow_nan and _misbehaves(call, "nan", None):
                return _Culprit(
                    call.site, call.index, call, rule="nan", inf_producers=tuple(producers)
                )
            continue
        if not follow_nan:
            return _Culprit(call.site, call.index, call, rule="nonfinite")
        if call.returned["nan"] > 0:
            return _Culprit(call.site, call.index, call, rule="nan", inf_producers=tuple(producers))
        if call.site not in corrupted:
            site = session.sites[call.site]
            corrupted[call.site] = bool(_nonfinite_parameters(site, _block_of(call, session.sites)))
        if corrupted[call.site]:
            return _Culprit(call.site, call.index, call, rule="nonfinite")
        if not any(_inside(producer, call) for producer in producers):
            producers.append(call)  # the innermost producer, not the layers around it
    return None


def _inside(call: _Call | None, outer: _Call) -> bool:
    while call is not None:
        if call is outer:
            return True
        call = call.parent
    return False


def _block_of(call: _Call | None, sites: list[_Site]) -> int | None:
    """Which iteration of the innermost enclosing LayerStack a call belongs to."""
    while call is not None:
        parent = sites[call.site].parent
        if parent is not None and isinstance(sites[parent].layer, pz.nn.LayerStack):
            return call.index % sites[parent].layer.stack_axis_size
        call = call.parent
    return None


def _nonfinite_parameters(site: _Site, block: int | None) -> list[dict]:
    """Parameters of the culprit holding NaN/Inf (sliced to the block inside a LayerStack)."""
    _, variables = pz.unbind_variables(site.layer)
    found = []
    for var in variables:
        if not isinstance(var, pz.Parameter):
            continue
        value = var.value
        if block is not None and site.stack_axes:
            axis = site.stack_axes[-1][0]
            value = (
                pz.select(value)
                .at_instances_of(pz.nx.NamedArrayBase)
                .where(lambda array, axis=axis: axis in array.named_shape)
                .apply(lambda array, axis=axis: array[{axis: block}])
            )
        totals = {"nan": 0, "posinf": 0, "neginf": 0}
        for leaf in jax.tree_util.tree_leaves(value):
            for name, count in nonfinite_counts(np.asarray(leaf)).items():
                totals[name] += count
        if any(totals.values()):
            found.append({"label": str(var.label), **totals})
    return found


def _representative(calls: list[_Call], check: str, tolerance, culprit: _Culprit | None) -> _Call:
    for call in calls:
        if culprit is not None and call is culprit.call:
            return call
    for test in (
        lambda c: _misbehaves(c, check, tolerance),
        lambda c: c.exception is not None,
        lambda c: _bad(c.returned) > 0,
    ):
        for call in calls:
            if test(call):
                return call
    return calls[0]
