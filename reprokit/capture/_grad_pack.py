"""Packing a gradient issue: the layer's call plus what its backward pass received and produced.

A layer whose backward pass turns a finite cotangent into NaN cannot be
replayed from its forward inputs alone: its VJP needs the cotangent that
reached its output during the reporter's real backward pass of the whole
model. This module records that cotangent (an identity `jax.custom_vjp` on
the selected layer's output ships it to the host, from eager code, penzai's
`Jitted` or a `LayerStack`'s scan), then pulls it back through the layer's
stateless call with `reprokit.portable._gradients.call_layer_vjp`, the very
function replay uses, so the recorded gradients are what a faithful replay
computes. The forward record (inputs, parameters, state, output) is
`pack`'s as ever; the archive's signature is `nonfinite_grad`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from penzai import pz

from reprokit._errors import CaptureError, UsageError
from reprokit.capture._backward import gradient_pass, inexact_leaves, replace_inexact, tap
from reprokit.capture._capture import CallRecord
from reprokit.capture._options import PackOptions
from reprokit.capture._probe import _in_mode
from reprokit.capture._shipping import capture_call, ship
from reprokit.portable._calling import outcome_from_call
from reprokit.portable._gradients import call_layer_vjp, gradient_outcome
from reprokit.portable._verdict import detect_signature, nonfinite_counts


@dataclasses.dataclass(frozen=True)
class GradCallRecord(CallRecord):
    """A `CallRecord` with its backward pass: the output cotangent and the gradients it produced."""

    output_cotangent: tuple = ()
    gradients: dict | None = None

    @property
    def outcome(self) -> dict:
        return gradient_outcome(super().outcome, self.gradients)


class _Cotangents:
    """Where the output tap puts each call's cotangent (static: no jax conversion touches it)."""

    def __init__(self):
        self.received: list[list] = []

    def receive(self, cotangents: list) -> None:
        self.received.append([np.asarray(c) for c in cotangents])


@pz.pytree_dataclass
class _OutputTap(pz.nn.Layer):
    """Calls the layer and ships the cotangent that reaches its output in the backward pass."""

    wrapped: pz.nn.Layer
    sink: _Cotangents = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, argument, /, **side_inputs):
        output = self.wrapped(argument, **side_inputs)
        leaves = inexact_leaves(output)
        if not leaves:
            return output
        return replace_inexact(output, tap(leaves, lambda g: ship(list(g), self.sink.receive)))


def output_cotangent(
    selection: Any, argument: Any, side_inputs: dict, call_index: int, mode: str | None, loss: Any
) -> list:
    """The cotangent that reached call `call_index` of the selected layer in `jax.grad` of the loss."""
    sink = _Cotangents()
    model = _in_mode(selection.set(_OutputTap(wrapped=selection.get(), sink=sink)), mode)
    error, _ = gradient_pass(model, argument, side_inputs, mode, loss, keep_state=selection.deselect())
    if error is not None:
        raise CaptureError(
            f"the model's gradient raised {type(error).__name__} while packing: {error}"
        )
    calls = len(sink.received)
    if call_index >= calls:
        raise CaptureError(
            f"the layer's output received {calls} cotangent(s) in the backward pass, fewer than "
            f"call {call_index + 1} needs; its output may not reach the loss"
        )
    # The backward pass runs the calls in reverse.
    return sink.received[calls - 1 - call_index]


def _stats(name: str, array: Any) -> dict:
    host = np.asarray(array)
    counts = nonfinite_counts(host)
    wide = host.astype(np.complex128 if host.dtype.kind == "c" else np.float64)
    finite = np.abs(wide[np.isfinite(wide)])
    return {
        "path": name,
        "dtype": host.dtype.name,
        "shape": list(host.shape),
        **counts,
        "max_abs": float(finite.max()) if finite.size else 0.0,
    }


def backward_summary(cotangent: list, gradients: dict) -> dict:
    """The manifest's `backward` section: statistics of the cotangent and of each gradient."""
    return {
        "output_cotangent": [_stats(f"output_cotangent[{i}]", c) for i, c in enumerate(cotangent)],
        "gradients": [_stats(name, value) for name, value in gradients.items()],
    }


def record_backward(record: CallRecord, cotangent: list, mode: str) -> GradCallRecord:
    """`record` with the gradients its layer's VJP produces from `cotangent`, in `mode`."""
    output, final, gradients = call_layer_vjp(
        record.submodel,
        record.initial_var_values,
        record.argument,
        record.side_inputs,
        mode,
        [jax.numpy.asarray(c) for c in cotangent],
    )
    del output, final  # the forward record is the capture's, bitwise as replay computes it
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(CallRecord)}
    return GradCallRecord(
        **fields,
        output_cotangent=tuple(jax.numpy.asarray(c) for c in cotangent),
        gradients=dict(gradients),
    )


def pack_grad(
    selection: Any,
    argument: Any,
    *,
    side_inputs: dict,
    call_index: int,
    mode: str | None,
    loss: Any,
    out: str,
    options: PackOptions,
    extra_manifest: dict | None = None,
):
    """Records call `call_index` of the selected layer with its backward pass and writes the archive."""
    from reprokit.capture._write import write_archive

    if options.redact or options.max_size is not None:
        raise UsageError("redact and max_size are not supported yet for gradient issues (grad=)")
    if options.signature not in (None, "nonfinite_grad"):
        raise UsageError(
            f"with grad= the recorded issue is 'nonfinite_grad', not {options.signature!r}"
        )
    # The cotangent comes from the model run as it was searched; the record
    # from pack's capture, in the mode it replays in.
    run_mode = mode
    record, mode, count = capture_call(selection, argument, side_inputs, call_index, run_mode)
    if record.exception is not None:
        raise CaptureError(
            f"the layer raised {record.exception['type']} in its forward pass; pack it without grad="
        )
    cotangent = output_cotangent(selection, argument, side_inputs, call_index, run_mode, loss)
    arriving = {"nan": 0, "posinf": 0, "neginf": 0}
    for array in cotangent:
        for name, number in nonfinite_counts(np.asarray(array)).items():
            arriving[name] += number
    if any(arriving.values()):
        raise CaptureError(
            "the cotangent reaching this layer's output is already non-finite "
            f"({arriving['nan']} NaN, {arriving['posinf'] + arriving['neginf']} Inf): a layer "
            "after it in the forward pass made the NaN; reprokit.find(model, x, grad=loss) "
            "finds it"
        )
    grad_record = record_backward(record, cotangent, mode)
    outcome = gradient_outcome(
        outcome_from_call(record.output, record.final_var_values, None), grad_record.gradients
    )
    try:
        signature = detect_signature(outcome, "nonfinite_grad")
    except ValueError:
        raise CaptureError(
            "the layer's gradients are finite when its backward pass is replayed alone from the "
            f"recorded cotangent ({mode} mode); it is not the layer that makes the NaN (try "
            "reprokit.find(..., grad=loss))"
        ) from None
    _, keypath = _selected(selection)
    layer = selection.get()
    manifest = {"backward": backward_summary(cotangent, grad_record.gradients)}
    manifest.update(extra_manifest or {})
    return write_archive(
        grad_record,
        out=out,
        keypath=keypath,
        layer_type=f"{type(layer).__module__}.{type(layer).__qualname__}",
        mode=mode,
        call_count=count,
        options=options,
        extra_manifest=manifest,
        signature_info=signature,
    )


def _selected(selection: Any) -> tuple[Any, str]:
    from reprokit.capture._capture import selected_layer

    return selected_layer(selection)


def pack_grad_found(result: Any, *, out: str, extra_found_by: dict | None, options: Any):
    """`FindResult.pack` for a gradient search: the found call with its backward pass."""
    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    if result.check == "exception":
        raise CaptureError(
            f"{result.keypath} raised in its {result.found_by.get('raised_in', 'gradient')}; "
            "packing an exception raised in a backward pass is not supported yet: the report "
            "names the layer and the error"
        )
    found_by = {**(extra_found_by or {}), **result.found_by}
    return pack_grad(
        result.selection,
        result.argument,
        side_inputs=result.side_inputs,
        call_index=result.call_index,
        mode=result.mode,
        loss=result.grad,
        out=out,
        options=options or PackOptions(),
        extra_manifest={"found_by": found_by},
    )
