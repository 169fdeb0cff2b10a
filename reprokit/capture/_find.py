"""`reprokit.find`: locate the layer that misbehaves, in one instrumented pass.

`pack` needs a selection, but in a real bug hunt the user sees NaN in the
logits (or an exception, or numbers that drift away from a float64 run) and
does not know which of hundreds of layers started it. This module answers
that question by running the model once with every `pz.nn.Layer` wrapped in
a probe, and returns the innermost layer that misbehaved although what it
received was well-behaved.

This module is the orchestration and the public surface (`find`, `search`,
`FindResult`, `pack_found`); the parts live beside it, one concept each:
`_probe` (the instrumented pass and the call tree), `_reference` (the
float64 reference pass), `_culprit` (which call is the culprit),
`_find_report` (the printed report and the recorded `found_by`) and
`_shipping` (recording the found call again, inside a `LayerStack` too).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from penzai import pz

from reprokit._errors import CaptureError, UsageError
from reprokit.capture._culprit import _find_culprit
from reprokit.capture._find_report import _found_by, _header, _not_found_message, _render
from reprokit.capture._options import PackOptions
from reprokit.capture._probe import _layer_names, _run, _Session, tracing
from reprokit.capture._reference import _reference_values
from reprokit.capture._shipping import capture_call, inside_layer_stack
from reprokit.record import _flax

CHECKS = ("nonfinite", "exception", "mismatch", "inf")
FIND_MODES = ("eager", "jit")
# `PackOptions` fields that `search` decides (or that only `pack` across processes uses).
_CHOSEN_BY_SEARCH = frozenset({"call", "mode", "gather", "shards_dir"})


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
      grad: the loss of a gradient search (`grad=`), kept in-process so that
        `.pack()` records the layer's backward pass too; None otherwise.
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
    # The loss of a gradient search (`grad=`): used in-process to pack, never stored.
    grad: Any = dataclasses.field(default=None, repr=False)

    def pack(self, out: str = "layer.repro.zip", **options: Any):
        """Captures the culprit's call again and packs it; the archive records how it was found.

        The options are `reprokit.pack`'s (note, signature, allow_modules,
        check, redact, max_size, bundle_code, compress) but those that choose
        the call: the model runs once more, from the state it had when
        `search` ran, and the call `search` found is kept; the manifest's
        `found_by` holds `self.found_by`.

        Returns:
          The `PackResult` of the written archive.
        """
        chosen = sorted(set(options) & _CHOSEN_BY_SEARCH)
        if chosen:
            raise TypeError(f"FindResult.pack() got an unexpected keyword argument {chosen[0]!r}")
        quiet = options.pop("quiet", False)
        result = pack_found(self, out=out, options=PackOptions(**options))
        if not quiet:
            from reprokit.capture._pack import tell_user

            tell_user(result.summary())
        return result


def search(
    model: Any,
    argument: Any,
    *,
    side_inputs: dict | None = None,
    check: str = "nonfinite",
    reference: Any = None,
    tolerance: float | None = None,
    mode: str | None = None,
    grad: Any = None,
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
    if grad is not None:
        if check == "mismatch":
            raise UsageError("grad= works with check='nonfinite' or check='exception'")
        from reprokit.capture._backward import search_grad

        return FindResult(**search_grad(model, argument, side_inputs, check, mode, grad))

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
    grad: Any = None,
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
        When the model's output holds NaN, the NaN is followed: the culprit
        is the innermost layer that returned NaN from NaN-free inputs (the
        Softmax over a fully masked row, not the mask whose -inf is by
        design) unless a layer with NaN/Inf parameters comes first; the ±Inf
        producers before it are reported as context.
        "inf": the first layer that returned NaN/Inf from finite inputs,
        intentional ±Inf included (ask for it to find where an Inf starts).
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
      grad: a loss, `loss(output) -> scalar`, to look for the layer whose
        *backward* pass goes wrong: `jax.grad` of `loss(model(argument))`
        with respect to the parameters and the argument's inexact arrays
        runs with every layer's backward pass instrumented, and the culprit
        is the innermost layer that received finite inputs and a finite
        cotangent on its output and produced a non-finite cotangent for its
        argument or non-finite gradients for its parameters ("nonfinite"),
        or whose backward pass raised ("exception"). Used in-process only,
        never stored.

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
            grad=grad,
        )
    except CaptureError as error:
        if report and getattr(error, "report", None):
            print(error.report)
        raise
    if report:
        print(result.report)
    return result.selection


def pack_found(
    result: FindResult,
    *,
    out: str = "layer.repro.zip",
    extra_found_by: dict | None = None,
    options: PackOptions | None = None,
):
    """Packs the call `result` points at, recording in the manifest how it was found.

    `options` are the caller's `PackOptions`; their `call` and `mode` are not
    used (`result` says which call, and the mode it was found in).
    """
    from reprokit.capture._write import write_archive

    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    if result.grad is not None:
        from reprokit.capture._grad_pack import pack_grad_found

        return pack_grad_found(result, out=out, extra_found_by=extra_found_by, options=options)
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
    if result.check in ("nonfinite", "inf") and not record.misbehaves():
        raise CaptureError(
            f"{result.keypath} returned finite values when packed; it returned NaN/Inf when found "
            f"(packing runs the layer in {mode} mode: try mode='jit' or mode='eager')"
        )
    found_by = {**(extra_found_by or {}), **result.found_by}
    return write_archive(
        record,
        out=out,
        keypath=result.keypath,
        layer_type=result.layer_type,
        mode=mode,
        call_count=count,
        extra_manifest={"found_by": found_by},
        options=options,
        flax_path=_flax.flax_path(
            result.selection.deselect(), next(iter(result.selection.selected_by_path))
        ),
    )
