"""`find(grad=loss)`: the layer whose backward pass makes the first NaN.

The most common NaN in JAX is not in the forward pass: the logits are
finite and `jax.grad` of the loss is NaN (the gradient of `sqrt` or a norm
at a zero row, the `jnp.where` trap, a custom VJP). The forward probes of
`_probe` cannot see it, so this module runs `jax.grad` of `loss(model(x))`
with respect to the model's parameters (penzai v2: unbound, frozen, bound
again) and the argument's inexact leaves, with every layer wrapped in a
probe that also taps its backward pass: an identity `jax.custom_vjp` on the
layer's output reports the cotangent that arrived there, and identities on
its argument and parameters report the cotangents it produced for them.

The culprit is the innermost layer call that received finite forward
inputs and a finite cotangent on its output, and produced a non-finite
cotangent for its argument or non-finite gradients for its parameters.
Backward events reach the host through the same ordered callbacks as the
forward ones (eager, penzai's `Jitted`, a `LayerStack`'s scan, the whole
model under jit); a layer's k-th backward event belongs to its k-th call
from the end, since the backward pass runs the calls in reverse.

The rule lives here, apart from the forward culprit rule in `_culprit`, so
the two evolve independently.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from reprokit._errors import CaptureError, ReprokitError, UsageError
from reprokit.capture._probe import (
    _Call,
    _device_counts,
    _in_mode,
    _instrument,
    _is_inexact,
    _on_cpu,
    _preserved_state,
    _Probe,
    _Session,
    tracing,
)
from reprokit.portable._verdict import nonfinite_counts

_ZERO = {"nan": 0, "posinf": 0, "neginf": 0}


def _bad(counts: dict | None) -> int:
    return 0 if counts is None else counts["nan"] + counts["posinf"] + counts["neginf"]


def _counts_text(counts: dict | None) -> str:
    if counts is None:
        return "-"
    parts = [
        f"{counts[key]} {name}"
        for key, name in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
        if counts[key]
    ]
    return ", ".join(parts) if parts else "finite"


def _traced_counts(leaves: list) -> jax.Array:
    """NaN, +Inf, -Inf counts over the float leaves, as one reduction (few ops to compile)."""
    parts = []
    for leaf in leaves:
        if not _is_inexact(leaf):
            continue
        for part in (jnp.real(leaf), jnp.imag(leaf)) if jnp.iscomplexobj(leaf) else (leaf,):
            flat = part.reshape(-1)
            parts.append(jnp.stack([jnp.isnan(flat), flat == jnp.inf, flat == -jnp.inf]))
    if not parts:
        return jnp.zeros((3,), jnp.int32)
    joined = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return jnp.sum(joined, axis=1, dtype=jnp.int32)


def _host_counts(leaves: list) -> np.ndarray:
    """NaN, +Inf, -Inf counts of concrete arrays: on the host for CPU arrays, else on device."""
    if not all(_on_cpu(leaf) for leaf in leaves):
        return np.asarray(_device_counts(leaves))
    total = np.zeros(3, np.int64)
    for leaf in leaves:
        counts = nonfinite_counts(np.asarray(leaf))
        total += (counts["nan"], counts["posinf"], counts["neginf"])
    return total


def _plain_leaves(tree: Any) -> list:
    """The array leaves of a tree as they are (tracers stay tracers: no op is staged for them)."""
    out = []
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array | jax.core.Tracer):
            out.append(leaf)
        elif isinstance(leaf, np.ndarray | np.generic | int | float | complex):
            out.append(np.asarray(leaf))
    return out


def _received(layer: Any, argument: Any, side_inputs: dict) -> list:
    """What a layer receives: its argument, side inputs and the values of its state variables."""
    (_, arg, sides), variables = pz.unbind_variables((layer, argument, side_inputs))
    states = [var.value for var in variables if isinstance(var, pz.StateVariable)]
    return _plain_leaves((arg, sides, states))


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def inexact_leaves(tree: Any) -> list:
    """The inexact array leaves of a tree, in `tree_leaves` order (what gets a cotangent)."""
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if _is_array(leaf) and _is_inexact(leaf)]


def replace_inexact(tree: Any, new: list) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    given = iter(new)
    out = [next(given) if _is_array(leaf) and _is_inexact(leaf) else leaf for leaf in leaves]
    return treedef.unflatten(out)


def tap(leaves: list, on_cotangent: Any) -> list:
    """Identity on `leaves` whose backward pass calls `on_cotangent(cotangents)` (list of arrays)."""

    @jax.custom_vjp
    def identity(values):
        return values

    def forward(values):
        return values, None

    def backward(_, cotangents):
        on_cotangent(list(cotangents))
        return (cotangents,)

    identity.defvjp(forward, backward)
    return identity(list(leaves))


# ------------------------------------------------------------------ the session


class _GradSession(_Session):
    """A forward `_Session` that also keeps each layer's backward events."""

    def __init__(self, check: str):
        super().__init__(check)
        # (site, kind) -> counts per group, in the order the backward pass produced them.
        self.backward: dict[tuple[int, str], list[tuple[int, list[dict]]]] = {}
        # (kind, site) in the order backward Python ran (also while jit traced it).
        self.backward_python: list[tuple[str, int]] = []
        # Per layer: whether its argument has inexact leaves, and its own parameters' labels.
        self.produced: dict[int, tuple[bool, list[str]]] = {}
        # Traced calls that returned before their parent call did.
        self.orphans: list[_Call] = []
        self.sequence = 0

    def release(self) -> None:
        super().release()
        self.backward, self.backward_python, self.orphans = {}, [], []

    def forward_enter(self, site: int, leaves: list) -> Any:
        """Notes what a call received; returns what `forward_exit` needs (None when eager)."""
        # Under an eager jax.grad the values are JVP tracers, but their primals
        # are concrete: stop_gradient hands them over, and the forward summary
        # is taken as for an eager pass (no callback, no op on a tracer).
        primals = [jax.lax.stop_gradient(leaf) if _is_inexact(leaf) else leaf for leaf in leaves]
        if not tracing() and not any(isinstance(p, jax.core.Tracer) for p in primals):
            self.emit("enter", site, primals)
            return None
        # Traced: one event per call, sent on exit with both summaries (each
        # ordered callback costs compile time; the tree is rebuilt from the
        # static layer nesting, see `_on_traced_call`).
        return _traced_counts(primals)

    def forward_exit(self, site: int, received: Any, leaves: list) -> None:
        """Notes what a call returned (`received`: what `forward_enter` returned)."""
        primals = [jax.lax.stop_gradient(leaf) if _is_inexact(leaf) else leaf for leaf in leaves]
        if received is None:
            self.emit("exit", site, primals)
            return
        self._traced_events = True
        payload = jnp.stack([received, _traced_counts(primals)])
        jax.debug.callback(
            functools.partial(self._on_traced_call, site), payload, ordered=True
        )

    def _on_traced_call(self, site: int, counts: Any) -> None:
        """One traced call, reported when it returned (post-order).

        Its sublayer calls returned before it, and each layer's calls nest
        in its parent layer's calls: the calls of the parent layer that have
        returned and are not yet claimed by a parent are exactly its children.
        """
        try:
            (received, returned) = (
                dict(zip(("nan", "posinf", "neginf"), (int(v) for v in row), strict=True))
                for row in np.asarray(counts)
            )
            call = _Call(site=site, index=self.counts[site], parent=None)
            self.counts[site] += 1
            call.received, call.returned = received, returned
            waiting = []
            for child in self.orphans:
                if self.sites[child.site].parent == site:
                    child.parent = call
                else:
                    waiting.append(child)
            parent_site = self.sites[site].parent
            if self.stack and self.stack[-1].site == parent_site:
                call.parent = self.stack[-1]  # an eager caller (penzai's Jitted inside)
            elif parent_site is not None:
                waiting.append(call)
            self.orphans = waiting
            self.calls.append(call)
            self.returned.append(call)
        except Exception as error:  # a callback must not raise into XLA
            self.problem = self.problem or f"{type(error).__name__}: {error}"

    def on_backward(self, kind: str, site: int, groups: list[list]) -> None:
        """Called from a tap's backward pass with the cotangents, grouped (argument, or per label)."""
        self.backward_python.append((kind, site))
        if not tracing() and not any(
            isinstance(g, jax.core.Tracer) for group in groups for g in group
        ):
            self._on_backward(kind, site, *[_host_counts(group) for group in groups])
            return
        payload = [_traced_counts(group) for group in groups]
        jax.debug.callback(
            functools.partial(self._on_backward, kind, site), *payload, ordered=True
        )

    def _on_backward(self, kind: str, site: int, *counts: Any) -> None:
        try:
            summaries = []
            for array in counts:
                nan, posinf, neginf = (int(v) for v in np.asarray(array))
                summaries.append({"nan": nan, "posinf": posinf, "neginf": neginf})
            self.sequence += 1
            self.backward.setdefault((site, kind), []).append((self.sequence, summaries))
        except Exception as error:  # a callback must not raise into XLA
            self.problem = self.problem or f"{type(error).__name__}: {error}"


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # wrapped, site, session
class _GradProbe(_Probe):
    """A probe that also taps the backward pass of its layer: output, argument and parameters."""

    def __call__(self, argument, /, **side_inputs):
        session = self.session
        site = self.site
        python_index = session.note_python_call(site)
        received = session.forward_enter(site, _received(self.wrapped, argument, side_inputs))
        argument, layer = self._tapped_inputs(argument)
        try:
            output = layer(argument, **side_inputs)
        except ReprokitError:
            raise
        except Exception as error:
            session.on_raise(site, python_index, error)
            raise
        session.forward_exit(site, received, _plain_leaves(output))
        out_leaves = inexact_leaves(output)
        if out_leaves:
            tapped = tap(out_leaves, lambda g: session.on_backward("out", site, [g]))
            output = replace_inexact(output, tapped)
        return output

    def _tapped_inputs(self, argument: Any) -> tuple[Any, Any]:
        """(argument, layer) behind one tap reporting what the backward pass produced for them.

        One tap, so one backward event per call: the argument's cotangent,
        then each of the layer's own parameters' gradients. Parameters of
        sublayers are tapped by their own probes (each once, where it is used).
        """
        selection = (
            pz.select(self.wrapped)
            .at_subtrees_where(lambda node: isinstance(node, pz.ParameterValue | _Probe))
            .where(lambda node: isinstance(node, pz.ParameterValue))
        )
        params = selection.get_sequence()
        arg_leaves = inexact_leaves(argument)
        groups, leaves = [len(arg_leaves)], list(arg_leaves)
        for param in params:
            inner = inexact_leaves(param.value)
            groups.append(len(inner))
            leaves += inner
        if not leaves:
            return argument, self.wrapped
        self.session.produced[self.site] = (bool(arg_leaves), [str(p.label) for p in params])

        def report(cotangents):
            split, start = [], 0
            for size in groups:
                split.append(cotangents[start : start + size])
                start += size
            self.session.on_backward("produced", self.site, split)

        tapped = iter(tap(leaves, report))
        argument = replace_inexact(argument, [next(tapped) for _ in range(groups[0])])
        new = [
            dataclasses.replace(p, value=replace_inexact(p.value, [next(tapped) for _ in range(n)]))
            for p, n in zip(params, groups[1:], strict=True)
        ]
        return argument, selection.set_sequence(new) if params else self.wrapped


def _to_grad_probes(tree: Any) -> Any:
    """Turns every `_Probe` of an instrumented model into a `_GradProbe` (same site and session)."""
    return (
        pz.select(tree)
        .at_instances_of(_Probe)
        .apply(
            lambda probe: _GradProbe(
                wrapped=_to_grad_probes(probe.wrapped), site=probe.site, session=probe.session
            )
        )
    )


# ------------------------------------------------------------------ the pass


@dataclasses.dataclass
class _Backward:
    """What one call's backward pass did: cotangent at its output, what it produced."""

    out: dict | None = None
    argument: dict | None = None
    params: dict[str, dict] = dataclasses.field(default_factory=dict)
    order: int | None = None  # when its output cotangent arrived (backward order)

    def produced_bad(self) -> bool:
        return _bad(self.argument) > 0 or any(_bad(c) for c in self.params.values())


def _scalar_loss(value: Any) -> jax.Array:
    if isinstance(value, pz.nx.NamedArrayBase):
        value = value.unwrap() if not value.named_shape else value
    value = jnp.asarray(value) if not isinstance(value, pz.nx.NamedArrayBase) else value
    if isinstance(value, pz.nx.NamedArrayBase) or value.shape != ():
        raise UsageError(
            "grad= must return a scalar (e.g. lambda logits: logits.unwrap(...).mean()); "
            f"it returned shape {getattr(value, 'shape', None)}"
        )
    return value


def gradient_pass(
    model: Any,
    argument: Any,
    side_inputs: dict,
    mode: str | None,
    loss: Any,
    *,
    keep_state: Any,
) -> tuple[BaseException | None, dict]:
    """`jax.grad` of `loss(model(argument))` w.r.t. parameters and the argument's inexact leaves.

    `model` is already instrumented and put in its mode (with mode "jit" the
    gradient itself runs under jit). The state variables of `keep_state`
    (the user's model) are put back afterwards. Returns (the exception the
    pass raised, if any; NaN/+Inf/-Inf counts over all gradients).
    """
    unbound, params = pz.unbind_params(model)
    frozen = [param.freeze() for param in params]
    arg_leaves = inexact_leaves(argument)

    def objective(frozen_values, leaves):
        bound = pz.bind_variables(unbound, frozen_values)
        output = bound(replace_inexact(argument, leaves), **side_inputs)
        return _scalar_loss(loss(output))

    gradient = jax.grad(objective, argnums=(0, 1))
    if mode == "jit":
        gradient = jax.jit(gradient)
    error, totals = None, dict(_ZERO)
    with _preserved_state((keep_state, argument, side_inputs)):
        try:
            grads = gradient(frozen, arg_leaves)
            for leaf in jax.tree_util.tree_leaves(grads):
                if _is_array(leaf):
                    for name, count in nonfinite_counts(np.asarray(leaf)).items():
                        totals[name] += count
        except (ReprokitError, UsageError):
            raise
        except Exception as raised:
            error = raised
        jax.effects_barrier()
    return error, totals


def run_grad(
    model: Any,
    argument: Any,
    side_inputs: dict,
    session: _GradSession,
    mode: str | None,
    loss: Any,
) -> tuple[BaseException | None, dict]:
    """One instrumented `jax.grad` pass; returns (the exception raised, if any, gradient counts)."""
    instrumented = _in_mode(_to_grad_probes(_instrument(model, session)), mode)
    result = gradient_pass(instrumented, argument, side_inputs, mode, loss, keep_state=model)
    if session.problem:
        raise CaptureError(f"the instrumented pass lost track of the calls ({session.problem})")
    return result


def backward_of_calls(session: _GradSession) -> dict[int, _Backward]:
    """Each call's backward events (by `id(call)`); the k-th event is the k-th call from the end."""
    by_site: dict[int, list[_Call]] = {}
    for call in session.calls:
        by_site.setdefault(call.site, []).append(call)
    result: dict[int, _Backward] = {id(call): _Backward() for call in session.calls}
    for (site, kind), events in session.backward.items():
        calls = by_site.get(site, [])
        if len(events) > len(calls):
            raise CaptureError(
                f"the instrumented pass lost track of the calls (layer {site}: "
                f"{len(events)} backward events for {len(calls)} calls)"
            )
        for (order, groups), call in zip(events, reversed(calls), strict=False):
            backward = result[id(call)]
            if kind == "out":
                backward.out, backward.order = groups[0], order
            else:
                has_argument, labels = session.produced.get(site, (False, []))
                if has_argument:
                    backward.argument = groups[0]
                for label, counts in zip(labels, groups[1:], strict=False):
                    backward.params[label] = counts
    return result


# ------------------------------------------------------------------ the culprit


def _misbehaves_backward(call: _Call, backward: _Backward) -> bool:
    """Finite forward inputs and output cotangent; non-finite argument cotangent or gradients."""
    if call.received is None or _bad(call.received):
        return False
    if backward.out is None or _bad(backward.out):
        return False
    return backward.produced_bad()


def _ancestors(call: _Call) -> list[_Call]:
    found, parent = [], call.parent
    while parent is not None:
        found.append(parent)
        parent = parent.parent
    return found


def find_backward_culprit(session: _GradSession, backward: dict[int, _Backward]) -> _Call | None:
    """The innermost misbehaving call whose backward pass ran first (None: no such call)."""
    candidates = [c for c in session.calls if _misbehaves_backward(c, backward[id(c)])]
    enclosing = {id(a) for c in candidates for a in _ancestors(c)}
    innermost = [c for c in candidates if id(c) not in enclosing]
    if not innermost:
        return None
    return min(innermost, key=lambda c: backward[id(c)].order or 0)


def open_backward_site(session: _GradSession) -> int | None:
    """The innermost layer whose backward pass had started and not finished (for exceptions)."""
    open_sites: list[int] = []
    for kind, site in session.backward_python:
        if kind == "out":
            open_sites.append(site)
        elif site in open_sites:
            open_sites.remove(site)
    return open_sites[-1] if open_sites else None


# ------------------------------------------------------------------ report


def grad_found_by(session, call, backward, mode, totals) -> dict:
    """The `found_by` facts of a gradient search, as packed archives record them."""
    from reprokit.capture._culprit import _block_of
    from reprokit.capture._find_report import _jsonable

    mine = backward[id(call)]
    also = []
    for parent in _ancestors(call):
        if backward[id(parent)].produced_bad():
            also.append(session.sites[parent.site].keystr or "(the whole model)")
    return {
        "check": "nonfinite",
        "grad": True,
        "mode": mode or "as the model runs",
        "call_index": call.index,
        "call_count": session.counts[call.site],
        "block": _block_of(call, session.sites),
        "layers_instrumented": len(session.sites),
        "calls_seen": len(session.calls),
        "passes": 1,
        "received": _jsonable(call.received),
        "returned": _jsonable(call.returned),
        "output_cotangent": dict(mine.out or _ZERO),
        "argument_cotangent": None if mine.argument is None else dict(mine.argument),
        "parameter_gradients": [
            {"label": label, **counts} for label, counts in mine.params.items() if _bad(counts)
        ],
        "model_gradients": dict(totals),
        "also_misbehaved": also,
        "sublayer_calls": sum(c.parent is call for c in session.calls),
    }


def render_grad_report(session, backward, culprit: _Call | None, header: list[str]) -> str:
    """The layer tree with each layer's forward and backward status, the culprit marked."""
    by_site: dict[int, list[_Call]] = {}
    for call in session.calls:
        by_site.setdefault(call.site, []).append(call)
    chain: set[int] = set()
    site_index = culprit.site if culprit is not None else None
    while site_index is not None:
        chain.add(site_index)
        site_index = session.sites[site_index].parent
    rows = [("layer", "forward in", "forward out", "grad at output", "grad produced", "")]
    for s in session.sites:
        name = ("  " * s.depth) + (f"{s.segment}: {s.type_name}" if s.segment else s.type_name)
        calls = by_site.get(s.index, [])
        if not calls:
            rows.append((name, "", "not called", "", "", ""))
            continue
        call = next((c for c in calls if c is culprit), None)
        if call is None:
            call = next((c for c in calls if backward[id(c)].produced_bad()), calls[0])
        mine = backward[id(call)]
        produced = [mine.argument] + list(mine.params.values())
        total = dict(_ZERO)
        for counts in produced:
            for key in total:
                total[key] += (counts or _ZERO)[key]
        produced_text = "-" if all(c is None for c in produced) else _counts_text(total)
        marks = [f"call {call.index + 1} of {len(calls)}"] if len(calls) > 1 else []
        if culprit is not None and call is culprit:
            marks.append("<== CULPRIT")
        elif s.index in chain:
            marks.append("(contains the culprit)")
        rows.append(
            (
                name,
                _counts_text(call.received),
                _counts_text(call.returned),
                _counts_text(mine.out),
                produced_text,
                "  ".join(marks),
            )
        )
    widths = [min(max(len(r[i]) for r in rows), 60 if i == 0 else 22) for i in range(5)]
    lines = list(header) + [""]
    for row in rows:
        cells = [f"{cell:<{width}}" for cell, width in zip(row[:5], widths, strict=True)]
        lines.append(("  ".join(cells) + "  " + row[5]).rstrip())
    return "\n".join(lines)


def grad_header(session, culprit, found_by) -> list[str]:
    lines = [
        f"reprokit find: check=nonfinite, grad=loss, 1 instrumented jax.grad pass, "
        f"{len(session.sites)} layers, {len(session.calls)} calls"
    ]
    if culprit is None:
        return lines
    site = session.sites[culprit.site]
    lines.append(f"culprit: {site.keystr or '(the whole model)'} (its backward pass)")
    where = f"call {culprit.index + 1} of {found_by['call_count']}"
    if found_by.get("block") is not None:
        axis, size = site.stack_axes[-1]
        where += f"; LayerStack axis {axis!r} block {found_by['block']} of {size}"
    lines.append(f"  type: {site.layer_type} ({where})")
    lines.append(f"  forward: received {_counts_text(culprit.received)}, "
                 f"returned {_counts_text(culprit.returned)}")
    lines.append(f"  cotangent at its output: {_counts_text(found_by['output_cotangent'])}")
    argument = found_by["argument_cotangent"]
    if argument is not None:
        lines.append(f"  cotangent it produced for its argument: {_counts_text(argument)}")
    for param in found_by["parameter_gradients"]:
        lines.append(f"  non-finite gradient of parameter {param['label']}: {_counts_text(param)}")
    also = found_by.get("also_misbehaved") or []
    if also:
        lines.append(
            f"  ruled out: {len(also)} enclosing layer(s) whose gradients are non-finite only "
            "because they contain it"
        )
    return lines


def grad_not_found_message(session, backward, error, totals) -> str:
    if error is not None:
        return (
            f"the gradient pass raised {type(error).__name__}: {error}; "
            "try check='exception' with grad= to locate it"
        )
    roots = [call for call in session.calls if call.parent is None]
    if any(_bad(call.received) for call in roots):
        return (
            "the model's own inputs (argument, side inputs or state) already hold NaN/Inf; "
            "no layer introduced them"
        )
    if any(_bad(call.returned) for call in roots):
        return (
            "the forward pass already returns NaN/Inf: find the layer with "
            "reprokit.find(model, argument) (no grad=) first"
        )
    if any(_bad(backward[id(call)].out) for call in roots):
        return (
            "the loss's gradient with respect to the model's output is already non-finite; "
            "the NaN comes from the loss function, not from a layer"
        )
    if not _bad(totals):
        return (
            "no layer produced a non-finite gradient (check='nonfinite', grad=loss): every "
            "gradient with respect to the parameters and the argument is finite"
        )
    return (
        "the gradients are non-finite, but no layer's backward pass turned a finite cotangent "
        "into NaN/Inf (they may come from a side input or from code outside any layer)"
    )


# ------------------------------------------------------------------ search


def search_grad(model, argument, side_inputs: dict, check: str, mode: str | None, loss):
    """`search` with `grad=loss`: the layer whose backward pass makes the first NaN (or raises).

    Returns the fields of `reprokit.capture._find.FindResult` as a dict (that
    module builds it: this one stays below it in the import graph).
    """
    from reprokit.capture._culprit import _find_culprit

    if not callable(loss):
        raise UsageError(f"grad= takes the loss, a callable output -> scalar, not {loss!r}")
    if check not in ("nonfinite", "exception"):
        raise UsageError("grad= works with check='nonfinite' or check='exception'")
    session = _GradSession(check)
    try:
        error, totals = run_grad(model, argument, side_inputs, session, mode, loss)
        backward = backward_of_calls(session)
        if check == "exception":
            return _exception_result(
                model, argument, side_inputs, session, error, mode, loss, _find_culprit
            )
        culprit = find_backward_culprit(session, backward)
        if culprit is None:
            failure = CaptureError(grad_not_found_message(session, backward, error, totals))
            failure.report = render_grad_report(
                session, backward, None, grad_header(session, None, {})
            )
            raise failure
        site = session.sites[culprit.site]
        found_by = grad_found_by(session, culprit, backward, mode, totals)
        report = render_grad_report(
            session, backward, culprit, grad_header(session, culprit, found_by)
        )
        return dict(
            selection=pz.select(model).at_keypaths([site.keypath]),
            keypath=site.keystr or "(the whole model)",
            layer_type=site.layer_type,
            call_index=culprit.index,
            call_count=found_by["call_count"],
            check="nonfinite",
            found_by=found_by,
            report=report,
            argument=argument,
            side_inputs=side_inputs,
            mode=mode,
            grad=loss,
        )
    finally:
        session.release()


def _exception_result(model, argument, side_inputs, session, error, mode, loss, forward_rule):
    """check='exception' with grad=: the forward rule first, else the layer whose backward raised."""
    from reprokit.portable._calling import exception_info

    if error is None:
        raise CaptureError(
            "the model and its gradient ran without raising; check='exception' needs a call "
            "that raises"
        )
    forward = forward_rule(session, error, None)
    if forward is not None:
        site_index, call_index, where = forward.site, forward.call_index, "forward pass"
    else:
        site_index = open_backward_site(session)
        if site_index is None:
            raise CaptureError(
                f"the gradient pass raised {type(error).__name__} outside any layer's backward "
                "pass (e.g. in the loss, or an XLA runtime error); rerun with mode='eager'"
            )
        outs = [s for kind, s in session.backward_python if kind == "out" and s == site_index]
        count = max(session.counts[site_index], session.python_counts[site_index], 1)
        call_index, where = max(count - len(outs), 0), "backward pass"
    site = session.sites[site_index]
    info = exception_info(error)
    found_by = {
        "check": "exception",
        "grad": True,
        "mode": mode or "as the model runs",
        "call_index": call_index,
        "call_count": max(session.counts[site_index], session.python_counts[site_index]),
        "block": None,
        "layers_instrumented": len(session.sites),
        "calls_seen": len(session.calls),
        "passes": 1,
        "raised_in": where,
        "exception": {"type": info["type"], "message": _scrub(info["message"])},
    }
    header = [
        f"reprokit find: check=exception, grad=loss, 1 instrumented jax.grad pass, "
        f"{len(session.sites)} layers",
        f"culprit: {site.keystr or '(the whole model)'} (raised in its {where})",
        f"  type: {site.layer_type} (call {call_index + 1} of {found_by['call_count']})",
        f"  raised: {info['type']}: {found_by['exception']['message']}",
    ]
    return dict(
        selection=pz.select(model).at_keypaths([site.keypath]),
        keypath=site.keystr or "(the whole model)",
        layer_type=site.layer_type,
        call_index=call_index,
        call_count=found_by["call_count"],
        check="exception",
        found_by=found_by,
        report="\n".join(header),
        argument=argument,
        side_inputs=side_inputs,
        mode=mode,
        grad=loss,
    )


def _scrub(text: str) -> str:
    from reprokit.environment._scrub import scrub_text

    return scrub_text(str(text))
