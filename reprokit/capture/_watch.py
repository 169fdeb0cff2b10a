"""`reprokit.watch`: catch the first misbehaving call in a real loop and pack it on the spot.

A NaN at training step 40 000, or at token 900 of a decode with a KV cache,
depends on that step's exact inputs and state; rerunning the script to
`pack` it later rarely reaches the same values. `watch` returns the model
with a tripwire installed, the user keeps running their own loop, and the
first call that misbehaves is packed from that call's inputs and state.

Why the hot path holds no host callback: measured on jax 0.10.2 (CPU), any
`jax.debug.callback` inside a jitted computation, even one that never
fires, turns off jax's C++ dispatch fast path, which doubled the time of a
tiny transformer step under penzai's `Jitted` (+1.2 ms). So the tripwire
decides in-graph, with a few fused reductions, whether the watched layer
returned NaN/Inf from finite inputs, and keeps the first such call index
in one int32[2] `StateVariable`, which `Jitted` threads out like any state.
The root wrapper, which runs in Python between steps, keeps references to
the step's inputs and state values (jax arrays are immutable, so nothing is
copied), reads those two integers after the step (the one device sync),
and on a trip replays the step from exactly those values on a detached
copy of the model, locates or captures the layer (`reprokit.capture._find`) and
writes the archive. The user's variables are never touched by the replay.

Under the user's own `jax.jit` the root is traced, so it cannot read a
value between steps; there the step's inputs, state and parameters leave
the device through one conditional callback that runs only when the
tripwire fired (and costs jax's fast path, as measured above).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

from reprokit._errors import ReprokitError, UsageError
from reprokit.capture._capture import capture_calls, selected_layer
from reprokit.capture._find import FindResult, pack_found, search
from reprokit.capture._options import PackOptions
from reprokit.capture._pack import tell_user
from reprokit.capture._probe import _array_leaves, _is_inexact, _received_leaves, _stack_axes
from reprokit.capture._shipping import ship

WATCH_CHECKS = ("nonfinite", "exception")
ON_FAULT = ("continue", "raise")


class FaultDetected(ReprokitError):
    """Raised by a watched model (on_fault="raise") after it packed a misbehaving call.

    Attributes:
      archive: the `PackResult` of the archive written for it.
      model_call: which call of the watched model misbehaved (0-based), or
        None under the user's own jax.jit.
    """

    archive: Any = None
    model_call: int | None = None


def _trip_impl(counters, received, returned):
    calls, first = counters[0], counters[1]
    finite_in = jnp.bool_(True)
    for leaf in received:
        if _is_inexact(leaf):
            finite_in = finite_in & jnp.all(jnp.isfinite(leaf))
    bad_out = jnp.bool_(False)
    for leaf in returned:
        if _is_inexact(leaf):
            bad_out = bad_out | ~jnp.all(jnp.isfinite(leaf))
    first = jnp.where((first < 0) & finite_in & bad_out, calls, first)
    return jnp.stack([calls + 1, first])


# One dispatch when the model runs eagerly; inlined when traced.
_trip = jax.jit(_trip_impl)


@pz.pytree_dataclass
class _Tripwire(pz.nn.Layer):
    """Counts the watched layer's calls and notes, in-graph, the first that misbehaves.

    One int32[2] state variable, [calls so far, first call that tripped or
    -1]: the least state `Jitted` has to thread in and out per step.
    """

    wrapped: pz.nn.Layer
    counters: pz.StateVariable

    def __call__(self, argument, /, **side_inputs):
        received = _received_leaves(self.wrapped, argument, side_inputs)
        output = self.wrapped(argument, **side_inputs)
        self.counters.value = _trip(self.counters.value, received, _array_leaves(output))
        return output


@functools.cache
def _fresh_counters() -> jax.Array:
    """[0 calls, no trip]: made once and reused, so resetting allocates nothing."""
    return jnp.array([0, -1], jnp.int32)


_labels = itertools.count()
# Reset the call count this often, long before int32 could wrap.
_RESET_EVERY = 1 << 16


def _tripwire(layer: Any, keypath: tuple) -> _Tripwire:
    # Inside a LayerStack every variable needs its per-axis behaviour: the
    # counters are shared by all blocks (the scan carries them).
    axes = {axis: pz.nn.LayerStackVarBehavior.SHARED for axis, _ in _stack_axes(keypath)}
    metadata = {"layerstack_axes": axes} if axes else {}
    label = f"reprokit.watch/{next(_labels)}"
    return _Tripwire(
        wrapped=layer,
        counters=pz.StateVariable(_fresh_counters(), label=label, metadata=metadata),
    )


def _inside_jitted(model: Any, wrap: Any) -> Any:
    """Puts `wrap` around the model's body inside its outer `Jitted`s, so its checks compile in."""
    if isinstance(model, Jitted):
        return Jitted(body=_inside_jitted(model.body, wrap))
    return wrap(model)


def _io_state(tree: Any) -> dict[int, Any]:
    """Values of the variables in the inputs (e.g. a RandomStream's offset), before the call."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, pz.AbstractVariable))
    return {id(leaf): leaf.value for leaf in leaves if isinstance(leaf, pz.AbstractVariable)}


def _strip_tripwires(model: Any) -> Any:
    return pz.select(model).at_instances_of(_Tripwire).apply(lambda wire: wire.wrapped)


@dataclasses.dataclass
class _Step:
    """What one model call started from: references, not copies (jax arrays are immutable)."""

    plain_slots: Any
    argument_slots: Any
    side_slots: Any
    variables: list
    initial: list  # the value of each variable before the call

    def rebuild(self) -> tuple[Any, Any, dict]:
        """A detached copy of (model, argument, side inputs), variables at their initial values."""
        fresh = []
        for var, value in zip(self.variables, self.initial, strict=True):
            kind = pz.ParameterValue if isinstance(var, pz.Parameter) else pz.StateVariableValue
            fresh.append(kind(value=value, label=var.label, metadata=var.metadata))
        return pz.bind_variables(
            (self.plain_slots, self.argument_slots, self.side_slots), fresh, unfreeze_as_copy=True
        )


class _Watch:
    """Host-side state of one `watch`: configuration, cached structure, archives written."""

    def __init__(
        self,
        *,
        keypath: tuple | None,
        check: str,
        out: str,
        max_archives: int,
        on_fault: str,
        options: PackOptions,
        quiet: bool = False,
    ):
        self.quiet = quiet
        self.keypath = keypath
        self.check = check
        self.out = out
        self.max_archives = max_archives
        self.on_fault = on_fault
        self.options = options
        self.archives: list = []
        self.faults: list[dict] = []
        self.model_calls = 0
        self._body = None
        self._structure: tuple | None = None

    # ------------------------------------------------------------ per call

    def _structure_of(self, body: Any) -> tuple:
        """(tripwire, plain model with slots, its variables), cached while `body` is unchanged."""
        if body is not self._body:
            wires = pz.select(body).at_instances_of(_Tripwire).get_sequence()
            plain_slots, variables = pz.unbind_variables(_strip_tripwires(body))
            self._body = body
            self._structure = (wires[0] if wires else None, plain_slots, list(variables))
        return self._structure

    def budget_left(self) -> bool:
        return len(self.archives) < self.max_archives

    def call(self, body: Any, argument: Any, side_inputs: dict) -> Any:
        if not self.budget_left():
            return body(argument, **side_inputs)  # the watch is spent: stay out of the way
        wire, _, body_vars = self._structure_of(body)
        # The step's starting point, by reference: jax arrays are immutable, so
        # keeping them costs nothing, and nothing is copied unless a call trips.
        initial = [var.value for var in body_vars]
        io = (argument, side_inputs)
        start = wire.counters.value if wire is not None else None
        traced = any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((io, start))
        )
        model_call = None if traced else self.model_calls
        if traced:
            wire.counters.value = _fresh_counters()
        else:
            self.model_calls += 1
        io_values = _io_state(io)
        try:
            output = body(argument, **side_inputs)
        except ReprokitError:
            raise
        except Exception as error:
            if self.check == "exception":
                step = self._snapshot(body, argument, side_inputs, initial, io_values)
                self._on_exception(error, step, traced, model_call)
            raise
        if wire is None:
            return output
        counters = wire.counters.value
        if isinstance(counters, jax.core.Tracer):
            step = self._snapshot(body, argument, side_inputs, initial, io_values)
            tree = (step.plain_slots, step.argument_slots, step.side_slots)
            frozen = [
                self._frozen(var, value)
                for var, value in zip(step.variables, step.initial, strict=True)
            ]
            first = counters[1]
            ship((tree, frozen, first), self._on_shipped, when=first >= 0)
            # Leave no tracer in the variable once the trace ends.
            wire.counters.value = _fresh_counters()
            return output
        calls, first = (int(v) for v in np.asarray(counters))  # the one sync per step
        if first >= 0:
            wire.counters.value = _fresh_counters()
            step = self._snapshot(body, argument, side_inputs, initial, io_values)
            index = first - int(np.asarray(start)[0])
            self._on_trip(index, *step.rebuild(), mode=None, model_call=model_call)
        elif calls >= _RESET_EVERY:
            wire.counters.value = _fresh_counters()
        return output

    def _snapshot(self, body, argument, side_inputs, initial, io_values) -> _Step:
        """The step as it started: cached model slots, the inputs, every variable's value."""
        _, plain_slots, body_vars = self._structure_of(body)
        (argument_slots, side_slots), io_vars = pz.unbind_variables((argument, side_inputs))
        known = {id(var) for var in body_vars}
        extra = [var for var in io_vars if id(var) not in known]
        return _Step(
            plain_slots=plain_slots,
            argument_slots=argument_slots,
            side_slots=side_slots,
            variables=body_vars + extra,
            initial=initial + [io_values[id(var)] for var in extra],
        )

    @staticmethod
    def _frozen(var: Any, value: Any) -> Any:
        kind = pz.ParameterValue if isinstance(var, pz.Parameter) else pz.StateVariableValue
        return kind(value=value, label=var.label, metadata=var.metadata)

    def _on_shipped(self, parts: tuple) -> None:
        (slots, argument_slots, side_slots), frozen, first = parts
        if not self.budget_left():
            return
        model, argument, side_inputs = pz.bind_variables(
            (slots, argument_slots, side_slots), frozen, unfreeze_as_copy=True
        )
        # The step ran under the user's jax.jit: replay it under jit too.
        self._on_trip(int(first), model, argument, side_inputs, mode="jit", model_call=None)

    # ------------------------------------------------------------ on a fault

    def _path(self) -> str:
        n = len(self.archives)
        if n == 0:
            return self.out
        suffix = ".repro.zip" if self.out.endswith(".repro.zip") else ".zip"
        return f"{self.out[: -len(suffix)]}-{n + 1}{suffix}"

    def _result_for_selection(
        self, model: Any, argument: Any, side_inputs: dict, index: int, mode: str | None
    ) -> FindResult:
        selection = pz.select(model).at_keypaths([self.keypath])
        layer, keystr = selected_layer(selection)
        cls = type(layer)
        return FindResult(
            selection=selection,
            keypath=keystr,
            layer_type=f"{cls.__module__}.{cls.__qualname__}",
            call_index=index,
            call_count=0,
            check=self.check,
            found_by={"check": self.check, "call_index": index},
            report="",
            argument=argument,
            side_inputs=side_inputs,
            mode=mode,
        )

    def _pack(self, result: FindResult, model_call: int | None, mode: str | None) -> Any:
        watch_info = {
            "model_call": model_call,
            "watched": result.keypath if self.keypath is not None else "(the whole model)",
            "check": self.check,
            "replayed_from": "the step's exact inputs and state"
            + (" (the step ran under jax.jit)" if mode == "jit" else ""),
        }
        packed = pack_found(
            result,
            out=self._path(),
            extra_found_by={"watch": watch_info},
            options=self.options,
        )
        if not self.quiet:
            step = "" if model_call is None else f" at model call {model_call}"
            tell_user(f"reprokit.watch: wrote {packed.path}{step}\n{packed.summary()}")
        return packed

    def _on_trip(
        self,
        index: int,
        model: Any,
        argument: Any,
        side_inputs: dict,
        *,
        mode: str | None,
        model_call: int | None,
    ) -> None:
        fault: dict[str, Any] = {"model_call": model_call, "check": self.check}
        try:
            if self.keypath is None:
                result = search(
                    model, argument, side_inputs=side_inputs, check="nonfinite", mode=mode
                )
            else:
                result = self._result_for_selection(model, argument, side_inputs, index, mode)
            packed = self._pack(result, model_call, mode)
        except ReprokitError as error:
            fault["error"] = str(error)
            self.faults.append(fault)
            if self.on_fault == "raise":
                raise
            warnings.warn(
                f"reprokit.watch could not pack a misbehaving call: {error}", stacklevel=4
            )
            return
        self.archives.append(packed)
        fault.update(keypath=packed.keypath, call_index=packed.call_index, path=packed.path)
        self.faults.append(fault)
        if self.on_fault == "raise":
            step = "" if model_call is None else f" at model call {model_call}"
            error = FaultDetected(
                f"{packed.layer_type} at {packed.keypath} returned NaN/Inf from finite inputs"
                f"{step}; packed into {packed.path} (replay: reprokit run {os.path.basename(packed.path)})"
            )
            error.archive, error.model_call = packed, model_call
            raise error

    def _on_exception(
        self, error: BaseException, step: _Step, traced: bool, model_call: int | None
    ) -> None:
        if not self.budget_left():
            return
        if traced:
            error.add_note(
                "reprokit.watch cannot pack an exception raised while jax.jit traces the model "
                "(no values exist yet); call the watched model outside jax.jit (penzai's Jitted "
                "inside it is fine)"
            )
            return
        model, argument, side_inputs = step.rebuild()
        try:
            if self.keypath is None:
                result = search(model, argument, side_inputs=side_inputs, check="exception")
            else:
                selection = pz.select(model).at_keypaths([self.keypath])
                capture = capture_calls(selection, argument, side_inputs)
                raising = [record for record in capture.calls if record.exception is not None]
                if not raising:
                    return  # raised elsewhere in the model, not by the watched layer
                result = self._result_for_selection(
                    model, argument, side_inputs, raising[0].index, None
                )
            packed = self._pack(result, model_call, None)
        except ReprokitError as failure:
            self.faults.append(
                {"model_call": model_call, "check": "exception", "error": str(failure)}
            )
            error.add_note(f"reprokit.watch could not pack this exception: {failure}")
            return
        self.archives.append(packed)
        self.faults.append(
            {
                "model_call": model_call,
                "check": "exception",
                "keypath": packed.keypath,
                "call_index": packed.call_index,
                "path": packed.path,
            }
        )
        error.add_note(
            f"reprokit.watch packed this exception (raised by {packed.keypath}) into {packed.path}"
        )


@pz.pytree_dataclass
class Watched(pz.nn.Layer):
    """A model with reprokit's tripwire installed; call it exactly like the model.

    Attributes:
      body: the model, with a tripwire around the watched layer.
      session: host-side state (static): what was packed so far.
    """

    body: pz.nn.Layer
    session: _Watch = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, argument, /, **side_inputs):
        return self.session.call(self.body, argument, side_inputs)

    @property
    def archives(self) -> list:
        """`PackResult`s of the archives written so far, oldest first."""
        return list(self.session.archives)

    @property
    def faults(self) -> list[dict]:
        """Every misbehaving call seen: model call, layer, call index, archive path or error."""
        return list(self.session.faults)

    def unwatched(self) -> pz.nn.Layer:
        """The model without the tripwire (sharing its parameters and state)."""
        return _strip_tripwires(self.body)


def watch(
    selection_or_model: Any,
    *,
    out: str | os.PathLike = "watch.repro.zip",
    check: str = "nonfinite",
    max_archives: int = 1,
    on_fault: str = "continue",
    note: str = "",
    allow_modules: tuple[str, ...] | list[str] = (),
    self_check: bool = True,
    quiet: bool = False,
) -> Watched:
    """Returns the model with a tripwire: the first call that misbehaves is packed on the spot.

    Keep running your own loop (training steps, a decoding loop with a KV
    cache) with the returned model in place of yours. When a call misbehaves,
    reprokit replays that step from its exact inputs and state (kept by
    reference) on a detached copy of the model, captures the culprit and
    writes an archive; your model's variables are not touched.

    Training steps whose forward pass is finite but whose gradients are
    NaN/Inf are invisible here (the tripwire sees forward values): watch
    those with `reprokit.watch_training`, one check per step after your own
    jitted optax step.

    Args:
      selection_or_model: a `pz.nn.Layer` (watch the whole model: the
        culprit is then located with `reprokit.find`), or a `pz.Selection` of
        one layer inside a model (watch that layer's calls).
      out: path of the first archive; later ones get -2, -3... before
        `.repro.zip`.
      check: "nonfinite": a call that returns NaN/Inf from finite inputs
        (checked in-graph, cheaply); "exception": a call that raises (the
        exception is re-raised with a note naming the archive).
      max_archives: archives to write before the watch goes quiet.
      on_fault: "continue" (keep running) or "raise" (raise `FaultDetected`
        after packing; under your own jax.jit it surfaces as jax's runtime
        error carrying the same message).
      note: free text recorded in every archive.
      allow_modules: your own modules holding classes or functions in the model.
      self_check: replay each archive in a fresh process before keeping it.
      quiet: print nothing. Otherwise, in a terminal or a notebook, each
        archive written is announced (its path, and the summary `reprokit
        pack` prints; `.archives[i].summary()` keeps it).

    Returns:
      A `Watched` layer: call it like the model; `.archives` lists what was
      written, `.faults` every misbehaving call, `.unwatched()` gives the model back.
    """
    if check not in WATCH_CHECKS:
        raise UsageError(
            f"watch checks {' or '.join(WATCH_CHECKS)}, not {check!r}; for numbers that drift "
            "from a reference, run reprokit.find(model, x, check='mismatch') on a saved input"
        )
    if on_fault not in ON_FAULT:
        raise UsageError(f"on_fault must be one of {', '.join(ON_FAULT)}, not {on_fault!r}")
    if not isinstance(max_archives, int) or isinstance(max_archives, bool) or max_archives < 1:
        raise UsageError(f"max_archives must be an integer >= 1, not {max_archives!r}")
    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    if isinstance(selection_or_model, Watched):
        raise UsageError("this model is already watched; call .unwatched() first")
    if isinstance(selection_or_model, pz.Selection):
        selected_layer(selection_or_model)
        (keypath,) = selection_or_model.selected_by_path.keys()
        keypath = tuple(keypath)
        model = selection_or_model.deselect()
        wired = selection_or_model.apply(functools.partial(_tripwire, keypath=keypath))
    elif isinstance(selection_or_model, pz.nn.Layer):
        keypath, model = None, selection_or_model
        wired = _inside_jitted(model, lambda layer: _tripwire(layer, ()))
    else:
        raise UsageError(
            f"watch takes a pz.nn.Layer or a pz.Selection of one layer, not "
            f"{type(selection_or_model).__name__}"
        )
    # Exceptions are caught where the model is called: no tripwire needed.
    body = model if check == "exception" else wired
    session = _Watch(
        keypath=keypath,
        check=check,
        out=out,
        max_archives=max_archives,
        on_fault=on_fault,
        options=PackOptions(note=note, allow_modules=tuple(allow_modules), check=self_check),
        quiet=quiet,
    )
    return Watched(body=body, session=session)
