"""Recording one call of a layer wherever it runs, even inside a `LayerStack`'s scan.

`pack`'s capturer keeps Python-side state, which fails inside the scan a
`LayerStack` runs its blocks under. Packing what `find` or `watch` located
there needs the layer's values shipped to the host from traced code: `ship`
sends a tree out through an ordered callback and rebuilds it exactly
(typed PRNG keys, weak types), and `capture_call` uses it to record the
wanted call of the selected layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from reprokit._errors import CaptureError, ReprokitError
from reprokit.capture._capture import CallRecord, capture_calls
from reprokit.capture._probe import _in_mode, _is_key, _preserved_state, _stack_axes


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
