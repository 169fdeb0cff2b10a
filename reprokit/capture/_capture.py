"""Capture of every call of a selected layer inside a real model run.

penzai's `call_and_extract_submodel` records a layer's inputs only after the
layer returns, so a layer that raises leaves nothing behind. Here the
capturer freezes the layer's parameters and snapshots its argument, side
inputs and state-variable values *before* calling it, then records either
the output and final state or the exception. Every call is kept; choosing
which one to pack is a separate, explicit step.

The capturer calls the layer through `reprokit.portable._calling.call_layer`, the
same function replay uses, so the recorded output is exactly what replay
computes in the recorded mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import jax
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

from reprokit._errors import CaptureError, ReprokitError, UsageError
from reprokit.portable._calling import MODES, call_layer, exception_info, outcome_from_call
from reprokit.portable._verdict import nonfinite_counts
from reprokit.record import _flax

_TRACEBACK_FRAMES = 8


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One call of the selected layer: what went in, and what came out or was raised."""

    index: int
    submodel: Any
    argument: Any
    side_inputs: dict
    initial_var_values: tuple
    output: Any = None
    final_var_values: tuple | None = None
    exception: dict | None = None

    @functools.cached_property
    def outcome(self) -> dict:
        # Cached: choosing the call and deciding the recorded issue both read it,
        # and it converts every output leaf to numpy.
        return outcome_from_call(self.output, self.final_var_values, self.exception)

    def misbehaves(self) -> bool:
        """Raised, or returned any NaN/Inf."""
        if self.exception is not None:
            return True
        return any(any(nonfinite_counts(leaf).values()) for _, leaf in self.outcome["output"])


@dataclasses.dataclass(frozen=True)
class Capture:
    """All calls of one selected layer during one model call."""

    calls: tuple[CallRecord, ...]
    mode: str
    keypath: str
    layer_type: str
    model_exception: dict | None
    # The Flax module path (`Encoder/LayerNorm_0`) of a layer from penzai's unflaxify.
    flax_path: str | None = None


class _Sink:
    """Where the capturer puts its records (static, so no jax conversion touches them)."""

    def __init__(self):
        self.value: list[CallRecord] = []


@pz.pytree_dataclass
class _Capturer(pz.nn.Layer):
    """Stands in for the selected layer and records each call before making it."""

    wrapped: pz.nn.Layer
    calls: _Sink = dataclasses.field(metadata={"pytree_node": False})
    mode: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, argument, /, **side_inputs):
        frozen = pz.freeze_params(self.wrapped)
        what = "the selected layer's input"
        (submodel, stateless_arg, stateless_sides), variables = _unbind(
            (frozen, argument, side_inputs), what
        )
        for var in variables:
            if not isinstance(var, pz.StateVariable):
                raise CaptureError(
                    f"the selected layer holds {type(var).__name__}; expected StateVariables"
                )
        initial = pz.freeze_variables(variables)
        _refuse_tracers(initial, what)
        index = len(self.calls.value)
        record = dict(
            index=index,
            submodel=submodel,
            argument=stateless_arg,
            side_inputs=dict(stateless_sides),
            initial_var_values=tuple(initial),
        )
        try:
            output, final = call_layer(submodel, initial, stateless_arg, stateless_sides, self.mode)
        except ReprokitError:
            raise
        except Exception as error:
            info = exception_info(error)
            info["traceback"] = short_traceback(error)
            self.calls.value = self.calls.value + [CallRecord(**record, exception=info)]
            raise
        for var, value in zip(variables, final, strict=True):
            var.value = value.value
        self.calls.value = self.calls.value + [
            CallRecord(**record, output=output, final_var_values=tuple(final))
        ]
        return output


def _refuse_tracers(tree: Any, what: str) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            raise _traced(what)


def _traced(what: str) -> CaptureError:
    return CaptureError(
        f"{what} holds traced values: reprokit.pack was called inside jax.jit/vmap/grad or "
        "a user jax.jit around the model. Call pack outside any transformation with concrete "
        "arrays; pass mode='jit' to record the layer under jit"
    )


def _unbind(tree: Any, what: str) -> tuple[Any, tuple]:
    """`pz.unbind_variables(tree)`, refusing traced leaves, in one walk when it holds no variables.

    penzai's version walks the tree with key paths and rebuilds it; for a
    layer called on 10,000 NamedArrays that was the capture's largest cost,
    for a tree that (most often) holds no variable at all. Such a tree is
    returned as it is; any variable or slot in it, and penzai unbinds it.
    """
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_slot):
        if isinstance(leaf, (pz.AbstractVariable, pz.AbstractVariableSlot)):
            unbound, variables = pz.unbind_variables(tree)
            _refuse_tracers(unbound, what)
            return unbound, variables
        if isinstance(leaf, jax.core.Tracer):
            raise _traced(what)
    return tree, ()


def _is_slot(node: Any) -> bool:
    return isinstance(node, pz.AbstractVariableSlot)


def selected_layer(selection: Any) -> tuple[Any, str]:
    """Checks that `selection` picks exactly one layer of a layer; returns (layer, keypath)."""
    if not isinstance(selection, pz.Selection):
        raise UsageError(
            f"expected a pz.Selection of one layer, got {type(selection).__name__}; "
            "build one with pz.select(model).at_instances_of(...).pick_nth_selected(0)"
        )
    count = selection.count()
    if count != 1:
        raise UsageError(
            f"the selection matches {count} layers; it must match exactly one "
            "(narrow it, e.g. with .pick_nth_selected(N))"
        )
    layer = selection.get()
    model = selection.deselect()
    if not isinstance(layer, pz.nn.Layer):
        raise UsageError(f"the selection picks a {type(layer).__name__}, not a pz.nn.Layer")
    if not isinstance(model, pz.nn.Layer):
        raise UsageError(
            f"the selection was built from a {type(model).__name__}, not a pz.nn.Layer"
        )
    (keypath,) = selection.selected_by_path.keys()
    return layer, pz.pretty_keystr(keypath, model) or "(the whole model)"


def _strip_jit_around(model: Any) -> tuple[Any, bool]:
    """Removes `Jitted` wrappers around the capturer (a capturer cannot record from inside jit)."""
    stripped = False
    while True:
        wrappers = (
            pz.select(model)
            .at_instances_of(Jitted)
            .where(lambda j: pz.select(j).at_instances_of(_Capturer).count() > 0)
        )
        if wrappers.count() == 0:
            return model, stripped
        model = wrappers.apply(lambda j: j.body)
        stripped = True


def capture_calls(
    selection: Any, argument: Any, side_inputs: dict, mode: str | None = None
) -> Capture:
    """Runs the selection's model once on `argument`, recording every call of the selected layer."""
    layer, keypath = selected_layer(selection)
    if mode is not None and mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    _refuse_tracers((argument, side_inputs), "the argument or side inputs")
    calls = _Sink()
    model = selection.set(_Capturer(calls=calls, wrapped=layer, mode=mode or "eager"))
    model, stripped = _strip_jit_around(model)
    if mode is None and stripped:
        # The user runs this layer under penzai's Jitted wrapper: record it under jit.
        model = (
            pz.select(model)
            .at_instances_of(_Capturer)
            .apply(lambda c: dataclasses.replace(c, mode="jit"))
        )
        mode = "jit"
    model_exception = None
    # The capturer advances the model's state as the real run would (later layers
    # see the updated cache), so every StateVariable is put back afterwards: a user
    # packing inside a decoding loop must find their KV cache where they left it.
    with preserved_state((selection.deselect(), argument, side_inputs)):
        try:
            model(argument, **side_inputs)
        except ReprokitError:
            raise
        except Exception as error:
            model_exception = exception_info(error)
    layer_type = f"{type(layer).__module__}.{type(layer).__qualname__}"
    if not calls.value:
        if model_exception is not None:
            raise CaptureError(
                f"the model raised {model_exception['type']} before the selected layer {keypath} "
                f"was called: {model_exception['message']}"
            )
        raise CaptureError(f"the selected layer {keypath} was never called by the model")
    return Capture(
        calls=tuple(calls.value),
        mode=mode or "eager",
        keypath=keypath,
        layer_type=layer_type,
        model_exception=model_exception,
        flax_path=_flax.flax_path(selection.deselect(), next(iter(selection.selected_by_path))),
    )


@contextlib.contextmanager
def preserved_state(tree: Any) -> Iterator[None]:
    """Puts every StateVariable in `tree` back to its value on entry, however the block ends.

    KV caches (`cache_end_index`), counters and `RandomStream` offsets all live
    in StateVariables; a capture runs the user's model and must leave it as it
    found it.
    """
    saved = [(var, var.value) for var in _variables(tree) if isinstance(var, pz.StateVariable)]
    try:
        yield
    finally:
        for var, value in saved:
            var.value = value


def _variables(tree: Any) -> tuple:
    """The variables `pz.unbind_variables(tree)` would return, without rebuilding the tree.

    penzai's version walks the tree with key paths and builds a copy with
    slots, which cost a second per 10,000 NamedArrays for a list of (usually)
    a few variables; slots already present or two variables sharing a slot
    are penzai's to judge, so those trees take its path.
    """
    found: dict[Any, Any] = {}
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_slot):
        if isinstance(leaf, pz.AbstractVariableSlot):
            return pz.unbind_variables(tree)[1]
        if isinstance(leaf, pz.AbstractVariable):
            slot = leaf.get_slot()
            if found.setdefault(slot, leaf) is not leaf:
                return pz.unbind_variables(tree)[1]
    return tuple(found.values())


def choose_call(capture: Capture, call: int | None = None) -> CallRecord:
    """The call to pack: `call` if given, else the first that misbehaves, else the first."""
    if call is not None:
        if not isinstance(call, int) or not -len(capture.calls) <= call < len(capture.calls):
            raise UsageError(
                f"call={call!r}, but the selected layer was called {len(capture.calls)} times"
            )
        return capture.calls[call]
    for record in capture.calls:
        if record.misbehaves():
            return record
    return capture.calls[0]


def short_traceback(error: BaseException) -> list[str]:
    """The last frames of a traceback as 'file:line in function' with no absolute paths."""
    frames = traceback.extract_tb(error.__traceback__)[-_TRACEBACK_FRAMES:]
    return [f"{_relative(frame.filename)}:{frame.lineno} in {frame.name}" for frame in frames]


def _relative(filename: str) -> str:
    # A traceback's absolute paths reveal user names and home folders.
    path = os.path.abspath(filename)
    for root in sorted({p for p in sys.path if p and os.path.isabs(p)}, key=len, reverse=True):
        if path.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.relpath(path, root)
    cwd = os.getcwd()
    if path.startswith(cwd + os.sep):
        return os.path.relpath(path, cwd)
    return os.path.basename(path)
