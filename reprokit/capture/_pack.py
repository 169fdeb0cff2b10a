"""`reprokit.pack`: capture a failing layer and write it as one `.repro.zip`.

This is the pipeline's front half, capture -> encode -> archive: run the
model once with a capturer on the selected layer, pick the call to keep,
and hand it to `reprokit.capture._write.write_archive`, which decides the
recorded issue, encodes the record and streams it with the environment, a
generated `replay.py` and a README into one archive written atomically.
`pack` gathers its keyword arguments into one `PackOptions` (the CLI builds
that itself and calls `pack_selection`); with several jax processes the
multi-process path (`reprokit.capture._multihost`) takes over.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from reprokit._errors import UsageError
from reprokit.archive import _format
from reprokit.archive._collector import collector_paused
from reprokit.capture._capture import CallRecord, capture_calls, choose_call
from reprokit.capture._options import PackOptions
from reprokit.capture._write import PackResult, write_archive
from reprokit.portable._verdict import detect_signature

__all__ = ["PackResult", "pack", "pack_selection"]


def pack(
    selection: Any,
    argument: Any,
    *,
    side_inputs: dict | None = None,
    out: str | os.PathLike = "layer.repro.zip",
    note: str = "",
    call: int | None = None,
    signature: str | None = None,
    mode: str | None = None,
    allow_modules: tuple[str, ...] | list[str] = (),
    check: bool = True,
    redact: Any = None,
    max_size: str | int | None = None,
    bundle_code: bool = False,
    gather: bool = False,
    shards_dir: str | os.PathLike | None = None,
    compress: bool = False,
    quiet: bool = False,
    grad: Any = None,
) -> PackResult:
    """Captures the layer picked by `selection` while its model runs on `argument`, and packs it.

    Args:
      selection: a `pz.Selection` of exactly one `pz.nn.Layer` inside a model
        (e.g. `pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(2)`).
      argument: the model's positional argument.
      side_inputs: the model's side inputs (keyword arguments).
      out: archive path; by convention `NAME.repro.zip`.
      note: free text for the maintainer (what you saw, when).
      call: which call of the layer to pack (0-based); default: the first
        call that raises or returns NaN/Inf, else the first call.
      signature: the recorded issue: "exception", "nonfinite" or "output";
        default: detected from the call's outcome.
      mode: "eager" or "jit": how the layer is run for the record and on
        replay; default "jit" when the layer sits inside penzai's `Jitted`,
        else "eager".
      allow_modules: your own modules that hold classes or functions in the
        model; the maintainer must allow them too (`--allow-module`).
      check: replay the finished archive in a fresh process before returning
        and record whether it reproduces (the self-check); a few seconds.
      redact: replace private values, e.g. ["params=random"] or
        {"params": "random", "inputs": "random"} (kinds: random, zeros,
        shapes); weaker redactions are tried until the issue still reproduces.
      max_size: e.g. "25MB" (GitHub's attachment limit): compress, then zero
        the largest parameters the issue does not need, or refuse.
      compress: deflate each array member that shrinks by a tenth or more
        (slower to pack; replay reads it the same way); `max_size` does this
        by itself.
      bundle_code: copy the source of your own modules the layer needs (and
        of classes defined in your script) into the archive; the maintainer
        imports it only with `reprokit run --trust-code`.
      gather: with several jax processes, gather the arrays no process holds
        whole to every process instead of writing them with orbax (small
        layers only).
      shards_dir: with several jax processes, a folder reachable by all of
        them, in which each writes its shards (into `NAME.repro.zip.shards`,
        removed afterwards); default: the folder of `out`.
      quiet: print nothing. Otherwise, in a terminal or a notebook, pack
        prints the same short summary as `reprokit pack` (the result keeps
        it: `result.summary()`).
      grad: a loss, `loss(output) -> scalar`, for a gradient issue (finite
        forward pass, NaN gradient): the archive also records the cotangent
        that reached the layer's output in `jax.grad` of `loss(model(argument))`
        and the gradients the layer's VJP produces from it (signature
        `nonfinite_grad`); replay pulls that cotangent back with `jax.vjp`.
        Used in-process only, never stored. `reprokit.find(..., grad=loss)`
        finds the layer.

    Several jax processes (`jax.process_count() > 1`): call `pack` on every
    process; process 0 writes the archive (see `reprokit.capture._multihost`).

    Returns:
      A `PackResult` describing the archive.
    """
    result = pack_selection(
        selection,
        argument,
        side_inputs=side_inputs,
        out=out,
        options=PackOptions(
            note=note,
            call=call,
            signature=signature,
            mode=mode,
            allow_modules=tuple(allow_modules),
            check=check,
            redact=redact,
            max_size=max_size,
            bundle_code=bundle_code,
            compress=compress,
            gather=gather,
            shards_dir=shards_dir,
        ),
        grad=grad,
    )
    if not quiet:
        tell_user(result.summary())
    return result


def interactive() -> bool:
    """Whether a person reads this process's output: a terminal, or a Jupyter/IPython kernel."""
    if "ipykernel" in sys.modules or "IPython" in sys.modules:
        try:
            from IPython import get_ipython

            if get_ipython() is not None:
                return True
        except Exception:
            pass
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def tell_user(text: str) -> None:
    """Prints `text` when a person is reading (the Python API talks like the CLI)."""
    if interactive():
        print(text, flush=True)


def pack_selection(
    selection: Any,
    argument: Any,
    *,
    side_inputs: dict | None,
    out: str | os.PathLike,
    options: PackOptions,
    grad: Any = None,
) -> PackResult:
    """`pack` with its options already gathered (the CLI builds them once): see `pack`."""
    signature = options.signature
    if signature is not None and signature not in _format.SIGNATURE_KINDS:
        raise UsageError(
            f"signature must be one of {', '.join(_format.SIGNATURE_KINDS)}, not {signature!r}"
        )
    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    if grad is not None:
        # A gradient issue: the call plus its backward pass (reprokit.capture._grad_pack).
        from reprokit.capture._grad_pack import pack_grad

        return pack_grad(
            selection,
            argument,
            side_inputs=dict(side_inputs or {}),
            call_index=options.call or 0,
            mode=options.mode,
            loss=grad,
            out=out,
            options=options,
        )
    if signature == "nonfinite_grad":
        raise UsageError("signature 'nonfinite_grad' needs grad=loss (--grad script.py:loss)")
    import jax

    if jax.process_count() > 1:
        if options.redact or options.max_size is not None or options.compress:
            raise UsageError(
                "redact, max_size and compress are not supported when packing from several "
                "processes"
            )
        from reprokit.capture._multihost import pack_multiprocess

        return pack_multiprocess(
            selection, argument, side_inputs=dict(side_inputs or {}), out=out, options=options
        )
    with collector_paused():
        capture = capture_calls(selection, argument, dict(side_inputs or {}), options.mode)
        record = choose_call(capture, options.call)
        if signature is not None:
            _check_heisenbug(
                capture, record, signature, selection, argument, side_inputs, options.mode
            )
        return write_archive(
            record,
            out=out,
            keypath=capture.keypath,
            layer_type=capture.layer_type,
            mode=capture.mode,
            call_count=len(capture.calls),
            options=options,
            flax_path=capture.flax_path,
        )


def _shows(record: CallRecord, kind: str) -> bool:
    try:
        detect_signature(record.outcome, kind)
    except ValueError:
        return False
    return True


def _check_heisenbug(capture, record, kind, selection, argument, side_inputs, mode) -> None:
    """Says so when the issue the user reports does not appear under capture, and what might help."""
    if _shows(record, kind):
        return
    showing = [call.index for call in capture.calls if _shows(call, kind)]
    if showing:
        raise UsageError(
            f"call {record.index} of the layer shows no {kind} issue, but call {showing[0]} does: "
            f"pass call={showing[0]} (--call {showing[0]})"
        )
    other = "eager" if capture.mode == "jit" else "jit"
    if mode is None or mode == capture.mode:
        retry = capture_calls(selection, argument, dict(side_inputs or {}), other)
        if any(_shows(call, kind) for call in retry.calls):
            raise UsageError(
                f"the selected layer shows no {kind} issue when run {capture.mode}, but it does "
                f"when run {other}: pass mode={other!r} (--mode {other})"
            )
    if capture.model_exception is not None and kind != "exception":
        where = "the model raised " + capture.model_exception["type"]
    else:
        where = "the capture saw no such issue in this layer"
    raise UsageError(
        f"signature {kind!r} asked for, but the selected layer shows none in any of its "
        f"{len(capture.calls)} calls ({where}); the fault may be in another layer "
        "(try reprokit.find) or may vanish under capture"
    )
