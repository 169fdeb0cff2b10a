"""`reprokit.find`: locate the layer that misbehaves, in one instrumented pass.

`pack` needs a selection, but in a real bug hunt the user sees NaN in the
logits (or an exception, or numbers that drift away from a float64 run) and
does not know which of hundreds of layers started it. This module answers
that question by running the model once with every `pz.nn.Layer` wrapped in
a probe, and returns the innermost layer that misbehaved although what it
received was well-behaved.

Each probe emits an "enter" event with a summary of what its layer
received (argument, side inputs, state values) and an "exit" event with a
summary of what it returned. Where the probe runs traced (inside penzai's
`Jitted`, a `LayerStack`'s scan, or the whole model under jit) the event
leaves through `jax.debug.callback(..., ordered=True)`: penzai's own
capturers keep Python-side state, which fails inside a scan and leaks
tracers under jit, and an ordered callback is the one mechanism measured
to work in all of those (one event per block in a scan). For the
non-finite and exception checks a traced summary is three counts computed
on the device, so little leaves it. Where the probe runs eagerly the
values are already at hand and the event is handled directly (a callback
costs more than the layer). Ordered events rebuild the true call tree on
the host, one node per runtime call.

The culprit is the first call, in the order calls *return*, that misbehaves
while its inputs were well-behaved. A call returns after all of its
sublayer calls, so that call has no misbehaving descendant (it is the
innermost), and among disjoint candidates the first to return is also the
first to start: the rule is deterministic and needs one pass. Composite
layers that contain the culprit misbehave too; the report lists them as
what was ruled out in favour of the smallest layer.

Exceptions are attributed in Python: the first probe whose `except` sees an
exception object is the innermost layer it propagated from, which also
holds for errors raised while jit or scan traces the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

from reprokit._errors import CaptureError, ReprokitError, UsageError
from reprokit.capture._capture import CallRecord, capture_calls
from reprokit.environment._scrub import scrub_text
from reprokit.portable._calling import exception_info
from reprokit.portable._verdict import nonfinite_counts

CHECKS = ("nonfinite", "exception", "mismatch")
FIND_MODES = ("eager", "jit")
REFERENCES = ("float64", "eager", "jit")
# Below float32 round-off amplified through a small network (~1e-6 measured
# on the test models) and above a bf16 rounding step (~4e-3).
DEFAULT_TOLERANCE = 1e-3
# Low-precision calls are held to a few units of their own dtype instead.
_TOLERANCE_ULPS = 16
# Above this many layers the report folds subtrees away from the culprit.
_FULL_REPORT_LAYERS = 400


@dataclasses.dataclass(frozen=True)
class _Site:
    """One layer of the model as the probes number it (pre-order)."""

    index: int
    keypath: tuple
    keystr: str
    segment: str
    type_name: str
    layer_type: str
    parent: int | None
    depth: int
    layer: Any
    stack_axes: tuple  # (axis, size) of the LayerStacks around the layer, outermost first


@dataclasses.dataclass
class _Call:
    """One runtime call of a layer, as rebuilt from ordered events."""

    site: int
    index: int
    parent: _Call | None
    received: dict | None = None
    returned: dict | None = None
    exception: dict | None = None


# ------------------------------------------------------------------ leaves


def _array_leaves(tree: Any) -> list:
    """The array leaves of a tree (Python numbers become arrays; other leaves are dropped)."""
    out = []
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float | complex):
            out.append(jnp.asarray(leaf))
    return out


def tracing() -> bool:
    """Whether code runs under a jax trace (jit, scan, vmap...) rather than eagerly."""
    # Under a trace even a fresh constant is staged, so it comes back as a
    # tracer; looking at a layer's inputs is not enough (they may be constants).
    return isinstance(jnp.zeros((), jnp.int32), jax.core.Tracer)


def _is_key(array: Any) -> bool:
    return jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key)


def _is_inexact(array: Any) -> bool:
    return not _is_key(array) and jnp.issubdtype(array.dtype, jnp.inexact)


def _received_leaves(layer: Any, argument: Any, side_inputs: dict) -> list:
    """What a layer receives: its argument, side inputs and the values of its state variables."""
    (_, arg, sides), variables = pz.unbind_variables((layer, argument, side_inputs))
    states = [var.value for var in variables if isinstance(var, pz.StateVariable)]
    return _array_leaves((arg, sides, states))


def _on_cpu(array: Any) -> bool:
    devices = getattr(array, "devices", None)
    return devices is None or all(device.platform == "cpu" for device in devices())


def _device_counts(leaves: list) -> jax.Array:
    """NaN, +Inf, -Inf counts over all float leaves, computed where the values live."""
    total = jnp.zeros((3,), jnp.int32)
    for leaf in leaves:
        if not _is_inexact(leaf):
            continue
        parts = (jnp.real(leaf), jnp.imag(leaf)) if jnp.iscomplexobj(leaf) else (leaf,)
        for part in parts:
            counts = [jnp.sum(jnp.isnan(part)), jnp.sum(jnp.isposinf(part))]
            counts.append(jnp.sum(jnp.isneginf(part)))
            total = total + jnp.stack(counts).astype(jnp.int32)
    return total


def _leaf_error(main: np.ndarray, reference: np.ndarray) -> float:
    """Max |main - reference| over max |reference|; inf where only one side is non-finite."""
    if main.shape != reference.shape:
        return float("inf")
    wide = np.complex128 if np.iscomplexobj(main) or np.iscomplexobj(reference) else np.float64
    a, r = main.astype(wide), reference.astype(wide)
    finite_a, finite_r = np.isfinite(a), np.isfinite(r)
    same = (a == r) | (np.isnan(a) & np.isnan(r))
    if np.any((~finite_a | ~finite_r) & ~same):
        return float("inf")
    both = finite_a & finite_r
    if not np.any(both):
        return 0.0
    scale = float(np.max(np.abs(r[both])))
    diff = float(np.max(np.abs(a[both] - r[both])))
    return diff / max(scale, np.finfo(np.float64).tiny)


def _narrowest_eps(arrays: list) -> float:
    eps = [
        float(ml_dtypes.finfo(a.dtype).eps)
        for a in arrays
        if a.dtype.kind == "f" or a.dtype.name.startswith(("bfloat", "float8"))
    ]
    return max(eps, default=0.0)


# ------------------------------------------------------------------ events


class _Session:
    """Host-side state of one instrumented pass: the call tree rebuilt from events.

    It is a static (non-pytree) field of every probe, so jax never converts
    it; callbacks must not raise, so problems are kept and raised afterwards.
    """

    def __init__(self, check: str, *, keep_values: bool = False, reference: dict | None = None):
        self.check = check
        self.values = check == "mismatch"
        self.keep_values = keep_values
        self.reference = reference
        self.sites: list[_Site] = []
        self.calls: list[_Call] = []
        self.returned: list[_Call] = []
        self.stack: list[_Call] = []
        self.counts: list[int] = []
        self.python_counts: list[int] = []
        self.stored: dict[tuple, list] = {}
        self.raised: dict[int, tuple] = {}
        self._keep_alive: list[BaseException] = []
        self.problem: str | None = None
        self._traced_events = False

    def release(self) -> None:
        """Drops what the session holds once the search is over (it outlives it in jit caches)."""
        self.sites = []
        self.calls, self.returned, self.stack = [], [], []
        self.stored, self.raised, self._keep_alive = {}, {}, []
        self.reference = None

    # Probes call these while tracing or running.

    def note_python_call(self, site: int) -> int:
        index = self.python_counts[site]
        self.python_counts[site] += 1
        return index

    def emit(self, kind: str, site: int, leaves: list) -> None:
        if not tracing():
            # Eager: the values are here, so no callback (it costs more than the
            # layer); wait for events of jitted code dispatched before this one.
            if self._traced_events:
                jax.effects_barrier()
                self._traced_events = False
            floats = [leaf for leaf in leaves if _is_inexact(leaf)]
            if self.values or all(_on_cpu(leaf) for leaf in floats):
                self._on_event(kind, site, False, *floats)
            else:  # on an accelerator, move three counts rather than the values
                self._on_event(kind, site, True, _device_counts(floats))
            return
        self._traced_events = True
        counted = not self.values
        if counted:
            payload = [_device_counts(leaves)]
        else:
            payload = [leaf for leaf in leaves if _is_inexact(leaf)]
        callback = functools.partial(self._on_event, kind, site, counted)
        jax.debug.callback(callback, *payload, ordered=True)

    def on_raise(self, site: int, python_index: int, error: BaseException) -> None:
        host_call = None
        if self.stack and self.stack[-1].site == site:
            # Eager: the call's enter event ran, and it ends here without an exit.
            host_call = self.stack.pop()
            host_call.exception = exception_info(error)
        if id(error) not in self.raised:
            self.raised[id(error)] = (site, python_index, host_call)
            self._keep_alive.append(error)

    # Host callbacks.

    def _on_event(self, kind: str, site: int, counted: bool, *arrays: Any) -> None:
        try:
            if kind == "enter":
                parent = self.stack[-1] if self.stack else None
                call = _Call(site=site, index=self.counts[site], parent=parent)
                self.counts[site] += 1
                call.received = self._summary(call, "in", counted, arrays)
                self.stack.append(call)
                self.calls.append(call)
            else:
                if not self.stack or self.stack[-1].site != site:
                    self.problem = self.problem or f"exit of layer {site} out of order"
                    return
                call = self.stack.pop()
                call.returned = self._summary(call, "out", counted, arrays)
                self.returned.append(call)
        except Exception as error:  # a callback must not raise into XLA
            self.problem = self.problem or f"{type(error).__name__}: {error}"

    def _summary(self, call: _Call, where: str, counted: bool, arrays: tuple) -> dict:
        if counted:
            nan, posinf, neginf = (int(v) for v in np.asarray(arrays[0]))
            return {"nan": nan, "posinf": posinf, "neginf": neginf}
        host = [np.asarray(a) for a in arrays]
        summary = {"nan": 0, "posinf": 0, "neginf": 0}
        for array in host:
            for name, value in nonfinite_counts(array).items():
                summary[name] += value
        if not self.values:
            return summary
        key = (call.site, call.index, where)
        if self.keep_values:
            self.stored[key] = host
        if self.reference is not None:
            summary["eps"] = _narrowest_eps(host)
            reference = self.reference.get(key)
            if reference is None or len(reference) != len(host):
                summary["error"] = None
            else:
                summary["error"] = max(
                    (_leaf_error(a, r) for a, r in zip(host, reference, strict=True)), default=0.0
                )
        return summary


@pz.pytree_dataclass
class _Probe(pz.nn.Layer):
    """Wraps one layer: reports what it received and returned, and any exception it raised."""

    wrapped: pz.nn.Layer
    site: int = dataclasses.field(metadata={"pytree_node": False})
    session: _Session = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, argument, /, **side_inputs):
        session = self.session
        python_index = session.note_python_call(self.site)
        session.emit("enter", self.site, _received_leaves(self.wrapped, argument, side_inputs))
        try:
            output = self.wrapped(argument, **side_inputs)
        except ReprokitError:
            raise
        except Exception as error:
            session.on_raise(self.site, python_index, error)
            raise
        session.emit("exit", self.site, _array_leaves(output))
        return output


# ------------------------------------------------------------------ instrumenting


def _segment(keypath: tuple, parent: Any) -> str:
    """The keypath from a parent layer, as pz.pretty_keystr writes it, minus the parent's type."""
    text = pz.pretty_keystr(keypath, parent)
    name = type(parent).__name__
    return text[len(name) :] if text.startswith(name) else text


def _stack_axes(keypath: tuple) -> tuple:
    return tuple(
        (key.stack_axis, key.stack_axis_size)
        for key in keypath
        if isinstance(key, pz.nn.LayerStackGetAttrKey)
    )


def _instrument(model: Any, session: _Session) -> Any:
    """Wraps every layer of `model` in a probe; numbers layers in pre-order into `session.sites`."""
    sites: list[_Site | None] = []

    def visit(layer, keypath, parent, depth, segment):
        index = len(sites)
        sites.append(None)  # reserve the number: parents before children

        def child(relative, sublayer):
            return visit(
                sublayer, keypath + tuple(relative), index, depth + 1, _segment(relative, layer)
            )

        inner = (
            pz.select(layer)
            .at_children()
            .at_instances_of(pz.nn.Layer)
            .apply(child, with_keypath=True)
        )
        cls = type(layer)
        sites[index] = _Site(
            index=index,
            keypath=keypath,
            keystr=pz.pretty_keystr(keypath, model),
            segment=segment,
            type_name=cls.__name__,
            layer_type=f"{cls.__module__}.{cls.__qualname__}",
            parent=parent,
            depth=depth,
            layer=layer,
            stack_axes=_stack_axes(keypath),
        )
        return _Probe(wrapped=inner, site=index, session=session)

    instrumented = visit(model, (), None, 0, "")
    session.sites = sites
    session.counts = [0] * len(sites)
    session.python_counts = [0] * len(sites)
    return instrumented


def _strip_jitted(model: Any) -> Any:
    while True:
        wrappers = pz.select(model).at_instances_of(Jitted)
        if wrappers.count() == 0:
            return model
        model = wrappers.apply(lambda jitted: jitted.body)


def _in_mode(model: Any, mode: str | None) -> Any:
    """`model` run as asked: as it is (None), with every `Jitted` removed, or all under jit."""
    if mode == "eager":
        return _strip_jitted(model)
    if mode == "jit":
        return Jitted(model)
    return model


@contextlib.contextmanager
def _preserved_state(tree: Any) -> Iterator[None]:
    """Puts every state variable in `tree` back as it was: find must not advance a KV cache."""
    _, variables = pz.unbind_variables(tree)
    saved = [(var, var.value) for var in variables if isinstance(var, pz.StateVariable)]
    try:
        yield
    finally:
        for var, value in saved:
            var.value = value


def _run(
    model: Any, argument: Any, side_inputs: dict, session: _Session, mode: str | None
) -> BaseException | None:
    """One instrumented pass; returns the exception the model raised, if any."""
    instrumented = _in_mode(_instrument(model, session), mode)
    error = None
    with _preserved_state((model, argument, side_inputs)):
        try:
            instrumented(argument, **side_inputs)
        except ReprokitError:
            raise
        except Exception as raised:
            error = raised
        jax.effects_barrier()
    if session.problem:
        raise CaptureError(f"the instrumented pass lost track of the calls ({session.problem})")
    return error


# ------------------------------------------------------------------ the float64 reference


def _float64_like(value: Any) -> Any:
    """float64 in the same kind of object as a static dtype field, or None if not a float dtype."""
    try:
        if not isinstance(value, np.dtype | type):
            return None
        dtype = np.dtype(value)
    except TypeError:
        return None
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    if isinstance(value, np.dtype):
        return np.dtype(np.complex128 if complex_ else np.float64)
    if value.__module__.startswith("jax"):
        return jnp.complex128 if complex_ else jnp.float64
    return np.complex128 if complex_ else np.float64


def _promote_static_dtypes(tree: Any) -> Any:
    """Replaces float dtypes held in layers' static fields (e.g. CastToDType) by float64."""

    def go(node):
        node = pz.select(node).at_children().apply(go)
        if isinstance(node, pz.Struct):
            changes = {}
            for field in dataclasses.fields(node):
                if not field.metadata.get("pytree_node", True):
                    promoted = _float64_like(getattr(node, field.name))
                    if promoted is not None:
                        changes[field.name] = promoted
            if changes:
                fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
                node = type(node).from_attributes(**{**fields, **changes})
        return node

    return go(tree)


def _cast_float64(tree: Any) -> Any:
    def cast(leaf):
        if isinstance(leaf, jax.Array | np.ndarray | float | complex) and _is_inexact(
            jnp.asarray(leaf)
        ):
            return jnp.asarray(leaf, jnp.complex128 if jnp.iscomplexobj(leaf) else jnp.float64)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def _promoted(tree: Any) -> Any:
    """A float64 copy of (model, argument, side inputs) with fresh variables (call under x64)."""
    slots, values = pz.unbind_variables(tree, freeze=True)
    fresh = [
        type(value)(value=_cast_float64(value.value), label=value.label, metadata=value.metadata)
        for value in values
    ]
    slots = _promote_static_dtypes(_cast_float64(slots))
    return pz.bind_variables(slots, fresh, unfreeze_as_copy=True)


def _reference_values(
    model: Any, argument: Any, side_inputs: dict, reference: Any, mode: str | None
) -> tuple[dict, str, list]:
    """Runs the reference pass; returns each call's float inputs and outputs, its name, its layers."""
    session = _Session("mismatch", keep_values=True)
    if reference is None or reference == "float64":
        name = "float64 (jax_enable_x64, float64 parameters, matmul precision highest)"
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            ref_model, ref_arg, ref_sides = _promoted((model, argument, side_inputs))
            error = _run(ref_model, ref_arg, ref_sides, session, mode)
    elif reference in ("eager", "jit"):
        name = f"the same model run {'eagerly' if reference == 'eager' else 'under jax.jit'}"
        error = _run(model, argument, side_inputs, session, reference)
    elif isinstance(reference, pz.nn.Layer):
        name = f"the reference model ({type(reference).__name__})"
        error = _run(reference, argument, side_inputs, session, mode)
    else:
        raise UsageError(
            f"reference must be one of {', '.join(REFERENCES)} or a pz.nn.Layer, not {reference!r}"
        )
    if error is not None:
        raise CaptureError(
            f"the reference pass raised {type(error).__name__}: {error}; pass reference='eager', "
            "'jit' or a model to compare with"
        )
    stored, names = session.stored, _layer_names(session.sites)
    session.release()
    return stored, name, names


# ------------------------------------------------------------------ the culprit


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
    """The culprit test: bad output from well-behaved inputs."""
    if call.received is None or call.returned is None:
        return False
    if check == "nonfinite":
        return _bad(call.received) == 0 and _bad(call.returned) > 0
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
    for call in session.returned:
        if _misbehaves(call, session.check, tolerance):
            return _Culprit(call.site, call.index, call)
    return None


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


# ------------------------------------------------------------------ the report


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
    text = "err ?" if error is None else f"err {error:.1e}"
    return text if not _bad(summary) else f"{text}, {_counts_text(summary)}"


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
        name = ("  " * s.depth) + (f"{s.segment}: {s.type_name}" if s.segment else s.type_name)
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
            marks = [f"call {call.index + 1} of {len(calls)}"] if len(calls) > 1 else []
        if culprit is not None and s.index == culprit.site:
            marks.append("<== CULPRIT")
        elif s.index in chain:
            marks.append("(contains the culprit)")
        rows.append((name, in_text, out_text, "  ".join(marks)))
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


# ------------------------------------------------------------------ results


@dataclasses.dataclass(frozen=True)
class FindResult:
    """What `search` found: the layer, which of its calls, why, and a printable report.

    Attributes:
      selection: a `pz.Selection` of exactly the culprit layer in the model
        given to `search` (ready for `reprokit.pack`).
      keypath: the layer's keypath as `pz.pretty_keystr` writes it (what
        `reprokit pack --select` takes).
      layer_type: the layer's class, `module.QualName`.
      call_index: which call of that layer misbehaved (0-based, execution
        order); inside a `LayerStack` one call per block.
      call_count: how many times the layer was called in the pass.
      check: "nonfinite", "exception" or "mismatch".
      found_by: JSON-ready facts on the search, recorded in packed archives.
      report: the layer tree with each layer's status and the culprit marked.
      argument, side_inputs: the model's inputs the search ran on (`pack`
        runs the model on them again).
      mode: the `mode` the search ran the model in (None: as it is).
    """

    selection: Any
    keypath: str
    layer_type: str
    call_index: int
    call_count: int
    check: str
    found_by: dict
    report: str
    argument: Any = dataclasses.field(repr=False)
    side_inputs: dict = dataclasses.field(repr=False)
    mode: str | None = None

    def pack(
        self,
        out: str = "layer.repro.zip",
        *,
        note: str = "",
        signature: str | None = None,
        allow_modules: tuple[str, ...] | list[str] = (),
        check: bool = True,
        redact: Any = None,
        max_size: str | int | None = None,
        bundle_code: bool = False,
        compress: bool = False,
    ):
        """Captures the culprit's call again and packs it; the archive records how it was found.

        The options are `reprokit.pack`'s. The model runs once more, from the
        state it had when `search` ran, and the call `search` found is kept;
        the manifest's `found_by` holds `self.found_by`.

        Returns:
          The `PackResult` of the written archive.
        """
        return pack_found(
            self,
            out=out,
            note=note,
            signature=signature,
            allow_modules=allow_modules,
            check=check,
            redact=redact,
            max_size=max_size,
            bundle_code=bundle_code,
            compress=compress,
        )


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
    lines.append(f"culprit: {site.keystr or '(the whole model)'}")
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
        if check == "mismatch":
            lines.append(f"  tolerance: {found_by['tolerance']:.1e} (max error / max |reference|)")
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


def search(
    model: Any,
    argument: Any,
    *,
    side_inputs: dict | None = None,
    check: str = "nonfinite",
    reference: Any = None,
    tolerance: float | None = None,
    mode: str | None = None,
) -> FindResult:
    """Runs `model` once with every layer instrumented and returns what misbehaved, with a report.

    Same arguments as `find`; returns a `FindResult` (selection, call index,
    report, and `.pack()`). Raises `CaptureError` when nothing misbehaved;
    its `report` attribute then holds the layer tree.
    """
    if not isinstance(model, pz.nn.Layer):
        raise UsageError(
            f"find takes the model (a pz.nn.Layer), not a {type(model).__name__}; to look inside "
            "part of a model, pass that layer"
        )
    if check not in CHECKS:
        raise UsageError(f"check must be one of {', '.join(CHECKS)}, not {check!r}")
    if mode is not None and mode not in FIND_MODES:
        raise UsageError(f"mode must be one of {', '.join(FIND_MODES)} or None, not {mode!r}")
    if check != "mismatch" and (reference is not None or tolerance is not None):
        raise UsageError("reference= and tolerance= only apply to check='mismatch'")
    if tolerance is not None and not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise UsageError(f"tolerance must be a number >= 0, not {tolerance!r}")
    side_inputs = dict(side_inputs or {})
    if tracing():
        raise UsageError(
            "find runs the model itself: call it outside jax.jit/vmap/grad with concrete arrays "
            "(mode='jit' runs the model under jit)"
        )

    reference_values, reference_name, reference_sites = None, None, None
    if check == "mismatch":
        reference_values, reference_name, reference_sites = _reference_values(
            model, argument, side_inputs, reference, mode
        )
    session = _Session(check, reference=reference_values)
    try:
        error = _run(model, argument, side_inputs, session, mode)
        if reference_sites is not None and reference_sites != _layer_names(session.sites):
            raise UsageError(
                "the reference model's layers differ from the model's; pass a reference with "
                "the same layer tree"
            )
        return _conclude(
            model, argument, side_inputs, session, error, check, mode, tolerance, reference_name
        )
    finally:
        # jax's jit cache keeps the probes' static fields, and with them this
        # session: drop the layers, values and exceptions it holds.
        session.release()
        if reference_values is not None:
            reference_values.clear()


def _conclude(
    model, argument, side_inputs, session, error, check, mode, tolerance, reference_name
) -> FindResult:
    """The culprit, the report and the result of one search (or the error saying none)."""
    culprit = _find_culprit(session, error, tolerance)
    passes = 2 if check == "mismatch" else 1

    if culprit is None:
        message = _not_found_message(session, error, check, tolerance)
        report = _render(
            session, None, _header(session, None, check, passes, {}, reference_name), tolerance
        )
        failure = CaptureError(message)
        failure.report = report
        raise failure

    site = session.sites[culprit.site]
    found_by = _found_by(session, culprit, check, mode, passes, reference_name, tolerance)
    report = _render(
        session,
        culprit,
        _header(session, culprit, check, passes, found_by, reference_name),
        tolerance,
    )
    return FindResult(
        selection=pz.select(model).at_keypaths([site.keypath]),
        keypath=site.keystr or "(the whole model)",
        layer_type=site.layer_type,
        call_index=culprit.call_index,
        call_count=found_by["call_count"],
        check=check,
        found_by=found_by,
        report=report,
        argument=argument,
        side_inputs=side_inputs,
        mode=mode,
    )


def _layer_names(sites: list[_Site]) -> list[tuple[str, str]]:
    return [(site.keystr, site.type_name) for site in sites]


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
    if check == "nonfinite":
        found_by["nonfinite_parameters"] = _nonfinite_parameters(site, block)
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
    if check == "nonfinite":
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


def find(
    model: Any,
    argument: Any,
    *,
    side_inputs: dict | None = None,
    check: str = "nonfinite",
    reference: Any = None,
    tolerance: float | None = None,
    mode: str | None = None,
    report: bool = False,
) -> Any:
    """Finds the layer that misbehaves, calling the model once with every layer instrumented.

    Args:
      model: the model, a `pz.nn.Layer` (it may contain `LayerStack`s and
        penzai `Jitted` wrappers).
      argument: the model's positional argument.
      side_inputs: the model's side inputs (keyword arguments).
      check: what misbehaving means.
        "nonfinite": the layer received only finite values (argument, side
        inputs, state) and returned NaN/Inf; its non-finite parameters
        (a corrupted checkpoint) count as its own fault and are reported.
        "exception": the innermost layer an exception propagated from.
        "mismatch": compared with a reference pass, the layer's output error
        exceeds `tolerance` while its input error does not.
      reference: for "mismatch": "float64" (default: `jax_enable_x64`, float
        parameters, inputs and layers' float dtype fields promoted to float64,
        matmul precision "highest"), "eager" or "jit" (the same model run that
        way), or a `pz.nn.Layer` with the same layer tree (e.g. a copy on
        another device).
      tolerance: for "mismatch": the largest allowed max|error| / max|reference|
        of a call's values; default 1e-3, or 16 units in the last place of
        the call's narrowest float dtype when that is larger (bf16, f16).
      mode: None runs the model as it is (penzai `Jitted` wrappers kept);
        "eager" removes them; "jit" runs the whole model under jit (as a
        user's `jax.jit` would).
      report: print the layer tree with each layer's status, culprit marked.

    Returns:
      A `pz.Selection` of exactly one layer of `model`: the innermost one that
      misbehaved while its inputs were well-behaved (first call in execution
      order on ties). `search` returns the same with the call index, the
      report and `.pack()`.

    Raises:
      CaptureError: nothing misbehaved (the error's `report` attribute holds
        the layer tree), or the pass could not be followed.
      UsageError: bad arguments.
    """
    try:
        result = search(
            model,
            argument,
            side_inputs=side_inputs,
            check=check,
            reference=reference,
            tolerance=tolerance,
            mode=mode,
        )
    except CaptureError as error:
        if report and getattr(error, "report", None):
            print(error.report)
        raise
    if report:
        print(result.report)
    return result.selection


# ------------------------------------------------------------------ packing what was found


def ship(tree: Any, receive: Any, *, when: Any = None) -> None:
    """Sends `tree`'s values to `receive(tree)` on the host, from eager code, jit or a scan.

    Typed PRNG keys travel as key data and weak types are noted at trace
    time, since a callback delivers plain arrays; `receive` gets the tree
    rebuilt exactly. With `when` (a traced bool) the values leave the device
    only when it is true.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shipped, kinds = [], []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float | complex):
            kinds.append(("const", leaf))
            continue
        array = jnp.asarray(leaf)
        if _is_key(array):
            kinds.append(("key", str(jax.random.key_impl(array))))
            shipped.append(jax.random.key_data(array))
        else:
            aval = getattr(array, "aval", None)
            kinds.append(("array", bool(getattr(aval, "weak_type", False))))
            shipped.append(array)
    callback = functools.partial(_rebuild_and_receive, receive, treedef, tuple(kinds))
    if when is None:
        jax.debug.callback(callback, *shipped, ordered=True)
    else:
        jax.lax.cond(
            when,
            lambda: jax.debug.callback(callback, *shipped, ordered=True),
            lambda: None,
        )


def _rebuild_and_receive(receive, treedef, kinds, *arrays) -> None:
    from reprokit.portable._arrays import _as_weak_type

    values = iter(arrays)
    leaves = []
    for kind, extra in kinds:
        if kind == "const":
            leaves.append(extra)
        elif kind == "key":
            leaves.append(jax.random.wrap_key_data(jnp.asarray(next(values)), impl=extra))
        else:
            array = jnp.asarray(next(values))
            leaves.append(_as_weak_type(array) if extra else array)
    receive(treedef.unflatten(leaves))


class _ShippedCalls:
    """Keeps the one call of a shipping capturer that is wanted."""

    def __init__(self, wanted: int):
        self.wanted = wanted
        self.count = 0
        self.record: CallRecord | None = None
        self.problem: str | None = None

    def receive(self, parts: tuple) -> None:
        try:
            if self.count == self.wanted:
                submodel, argument, side_inputs, initial, output, final = parts
                self.record = CallRecord(
                    index=self.count,
                    submodel=submodel,
                    argument=argument,
                    side_inputs=dict(side_inputs),
                    initial_var_values=tuple(initial),
                    output=output,
                    final_var_values=tuple(final),
                )
            self.count += 1
        except Exception as error:  # never raise into XLA
            self.problem = f"{type(error).__name__}: {error}"


@pz.pytree_dataclass
class _ShippingCapturer(pz.nn.Layer):
    """Records a layer's calls from inside a scan by shipping its values to the host."""

    wrapped: pz.nn.Layer
    sink: _ShippedCalls = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, argument, /, **side_inputs):
        frozen = pz.freeze_params(self.wrapped)
        (submodel, arg, sides), variables = pz.unbind_variables((frozen, argument, side_inputs))
        initial = tuple(pz.freeze_variables(variables))
        output = self.wrapped(argument, **side_inputs)
        final = tuple(pz.freeze_variables(variables))
        ship((submodel, arg, dict(sides), initial, output, final), self.sink.receive)
        return output


def inside_layer_stack(selection: Any) -> bool:
    """Whether the selected layer sits inside a `LayerStack` (where `pack`'s capturer fails)."""
    return any(_stack_axes(tuple(kp)) for kp in selection.selected_by_path)


def capture_call(
    selection: Any, argument: Any, side_inputs: dict, call_index: int, mode: str | None
) -> tuple[CallRecord, str, int]:
    """Records call `call_index` of the selected layer; returns (record, mode, call count).

    Outside a `LayerStack` this is `pack`'s capture. Inside one, penzai runs
    the blocks under `jax.lax.scan`, so the layer's values are shipped out
    per block and the record replays under jit.
    """
    model = selection.deselect()
    if not inside_layer_stack(selection):
        with _preserved_state((model, argument, side_inputs)):
            capture = capture_calls(selection, argument, side_inputs, mode)
        if call_index >= len(capture.calls):
            raise CaptureError(
                f"the layer was called {len(capture.calls)} times when packed, fewer than when "
                "found; the model is not deterministic between calls"
            )
        return capture.calls[call_index], capture.mode, len(capture.calls)
    sink = _ShippedCalls(call_index)
    layer = selection.get()
    with_capturer = _in_mode(selection.set(_ShippingCapturer(wrapped=layer, sink=sink)), mode)
    with _preserved_state((model, argument, side_inputs)):
        try:
            with_capturer(argument, **side_inputs)
        except ReprokitError:
            raise
        except Exception as error:
            raise CaptureError(
                f"the model raised {type(error).__name__} while tracing the LayerStack: "
                f"{error}. A layer that raises inside a LayerStack raises before any value "
                "exists, so it cannot be packed; build the model without a LayerStack "
                "(e.g. use_layer_stack=False) to pack it"
            ) from None
        jax.effects_barrier()
    if sink.problem:
        raise CaptureError(f"could not record the layer's values: {sink.problem}")
    if sink.record is None:
        raise CaptureError(
            f"the layer was called {sink.count} times when packed, fewer than when found"
        )
    record, sink.record = sink.record, None  # the sink outlives this call in jit caches
    return record, "jit", sink.count


def pack_found(
    result: FindResult,
    *,
    out: str = "layer.repro.zip",
    extra_found_by: dict | None = None,
    **options: Any,
):
    """Packs the call `result` points at, recording in the manifest how it was found.

    `options` are `write_archive`'s (note, signature, allow_modules, check,
    redact, max_size, bundle_code, compress).
    """
    from reprokit.capture._pack import write_archive
    from reprokit.views._issue import write_issue_snippet

    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    if result.check == "exception" and inside_layer_stack(result.selection):
        raise CaptureError(
            f"{result.keypath} raised while its LayerStack was traced, before any value exists; "
            "it cannot be packed from inside the stack: build the model without a LayerStack "
            "(e.g. use_layer_stack=False) and pack again"
        )
    record, mode, count = capture_call(
        result.selection, result.argument, result.side_inputs, result.call_index, result.mode
    )
    if result.check == "exception" and record.exception is None:
        raise CaptureError(
            f"{result.keypath} did not raise when packed; it raised when found "
            f"({result.found_by.get('exception', {}).get('type')})"
        )
    if result.check == "nonfinite" and not record.misbehaves():
        raise CaptureError(
            f"{result.keypath} returned finite values when packed; it returned NaN/Inf when found "
            f"(packing runs the layer in {mode} mode: try mode='jit' or mode='eager')"
        )
    found_by = {**(extra_found_by or {}), **result.found_by}
    packed = write_archive(
        record,
        out=out,
        keypath=result.keypath,
        layer_type=result.layer_type,
        mode=mode,
        call_count=count,
        extra_manifest={"found_by": found_by},
        **options,
    )
    return dataclasses.replace(packed, issue_path=write_issue_snippet(packed.path))
