"""The instrumented pass of `find`: every layer wrapped in a probe, the call tree rebuilt.

`find` must see what each layer received and returned without knowing
whether the model runs eagerly, under penzai's `Jitted`, inside a
`LayerStack`'s scan or wholly under jit. This module owns that one pass;
choosing the culprit from what it saw is `_culprit`'s job.

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
the host, one node per runtime call. When a reference pass's values are
given, each summary also holds the call's error against them.

Exceptions are attributed in Python: the first probe whose `except` sees an
exception object is the innermost layer it propagated from, which also
holds for errors raised while jit or scan traces the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

from reprokit._errors import CaptureError, ReprokitError
from reprokit.portable._calling import exception_info
from reprokit.portable._verdict import nonfinite_counts


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
    return _leaf_errors(main, reference)[1]


def _leaf_errors(main: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """reprokit's one error metric (as `portable._verdict`): (abs, rel) with abs = max |main -
    reference| and rel = abs / max |reference|; inf where only one side is non-finite."""
    if main.shape != reference.shape:
        return float("inf"), float("inf")
    wide = np.complex128 if np.iscomplexobj(main) or np.iscomplexobj(reference) else np.float64
    a, r = main.astype(wide), reference.astype(wide)
    finite_a, finite_r = np.isfinite(a), np.isfinite(r)
    same = (a == r) | (np.isnan(a) & np.isnan(r))
    if np.any((~finite_a | ~finite_r) & ~same):
        return float("inf"), float("inf")
    both = finite_a & finite_r
    if not np.any(both):
        return 0.0, 0.0
    scale = float(np.max(np.abs(r[both])))
    diff = float(np.max(np.abs(a[both] - r[both])))
    return diff, diff / max(scale, np.finfo(np.float64).tiny)


def _narrowest_dtype(arrays: list) -> str | None:
    """The name of the float dtype with the largest eps among `arrays` (None: no float)."""
    floats = [
        a.dtype for a in arrays if a.dtype.kind == "f" or a.dtype.name.startswith(("bfloat", "float8"))
    ]
    return max(floats, key=lambda d: float(ml_dtypes.finfo(d).eps)).name if floats else None


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
            summary["dtype"] = _narrowest_dtype(host)
            reference = self.reference.get(key)
            if reference is None or len(reference) != len(host):
                summary["error"] = summary["abs_error"] = None
            else:
                errors = [_leaf_errors(a, r) for a, r in zip(host, reference, strict=True)]
                # A call's error is its worst leaf's, in both parts.
                summary["abs_error"] = max((e[0] for e in errors), default=0.0)
                summary["error"] = max((e[1] for e in errors), default=0.0)
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


def _layer_names(sites: list[_Site]) -> list[tuple[str, str]]:
    return [(site.keystr, site.type_name) for site in sites]
