"""`reprokit.watch_training`: the first training step whose gradients go non-finite, packed.

A NaN gradient at step 40 000 depends on that step's parameters and batch;
rerunning the script to find it later rarely reaches the same values. The
forward tripwire of `reprokit.watch` cannot see it either: the forward pass
is finite. A penzai/optax training loop already holds what is needed, the
parameters a step differentiated at, its batch and the gradients it
computed, so the watch is one call per step, after the user's own (jitted)
step, with no change to it:

    unbound, params = pz.unbind_params(model, freeze=True)
    guard = reprokit.watch_training(
        unbound,
        inputs=lambda batch: (batch["tokens"], {"token_positions": batch["positions"]}),
        loss=lambda logits, batch: cross_entropy(logits, batch["targets"]),
        out="grad-nan.repro.zip",
    )
    for batch in batches:
        new_params, opt_state, loss, grads = train_step(params, opt_state, batch)
        if not guard.check(grads, params=params, batch=batch):
            break  # guard.archives[-1] holds the layer whose backward pass made the NaN
        params = new_params

`check` costs one fused all-finite reduction and one scalar read per step.
When the values it is given hold NaN/Inf, the step's model is rebuilt from
`params` (a copy: the user's arrays are not touched), `reprokit.find(...,
grad=loss)` locates the layer whose backward pass made the first NaN, and
the call is packed with its backward pass (`nonfinite_grad`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from reprokit._errors import CaptureError, UsageError
from reprokit.capture._options import PackOptions

ON_FAULT = ("continue", "raise")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if hasattr(leaf, "dtype")
        and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


@dataclasses.dataclass
class TrainingWatch:
    """Watches a training loop's gradients; call `check` once per step (see `watch_training`).

    Attributes:
      archives: `PackResult`s of the archives written so far, oldest first.
      faults: every step whose values were non-finite: step, layer, archive
        path and find's report (the layer tree with forward and backward
        status), or the reason none was written.
      steps: how many steps were checked.
    """

    unbound: Any
    inputs: Any
    loss: Any
    out: str
    max_archives: int
    on_fault: str
    options: PackOptions
    mode: str | None
    archives: list = dataclasses.field(default_factory=list)
    faults: list = dataclasses.field(default_factory=list)
    steps: int = 0

    def check(self, watched: Any, *, params: Any, batch: Any) -> bool:
        """True when every value of `watched` is finite; else packs the culprit and returns False.

        Args:
          watched: what the step computed and you want finite: its gradients
            (best), its loss, or the updated parameters.
          params: the parameter values the step differentiated at (before the
            update), as `pz.unbind_params(model, freeze=True)` gives them.
          batch: the step's batch, as `inputs` and `loss` take it.
        """
        step = self.steps
        self.steps += 1
        if bool(_all_finite(watched)):
            return True
        if len(self.archives) >= self.max_archives:
            self.faults.append({"step": step, "path": None, "error": "archive budget spent"})
            return False
        fault: dict[str, Any] = {"step": step}
        self.faults.append(fault)
        try:
            packed, fault["report"] = self._pack(step, params, batch)
        except CaptureError as error:
            fault.update(path=None, error=str(error))
            if self.on_fault == "raise":
                raise
            return False
        self.archives.append(packed)
        fault.update(path=packed.path, keypath=packed.keypath, call_index=packed.call_index)
        if self.on_fault == "raise":
            from reprokit.capture._watch import FaultDetected

            failure = FaultDetected(
                f"training step {step} made non-finite gradients; {packed.keypath} packed into "
                f"{packed.path}"
            )
            failure.archive, failure.model_call = packed, step
            raise failure
        return False

    def _pack(self, step: int, params: Any, batch: Any):
        from reprokit.capture._find import pack_found, search

        # Parameters as fresh Parameter objects: find differentiates them, and
        # the user's own arrays and variables stay as they are.
        model = pz.bind_variables(self.unbound, params, unfreeze_as_copy=True)
        argument, side_inputs = _split_inputs(self.inputs(batch))
        loss = functools.partial(_batch_loss, self.loss, batch)
        result = search(model, argument, side_inputs=side_inputs, grad=loss, mode=self.mode)
        packed = pack_found(
            result,
            out=self._path(),
            extra_found_by={"watch_training": {"step": step}},
            options=self.options,
        )
        return packed, result.report

    def _path(self) -> str:
        count = len(self.archives)
        if count == 0:
            return self.out
        stem = self.out.removesuffix(".zip").removesuffix(".repro")
        return f"{stem}-{count + 1}.repro.zip"


def _batch_loss(loss: Any, batch: Any, output: Any) -> Any:
    return loss(output, batch)


def _split_inputs(inputs: Any) -> tuple[Any, dict]:
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
        return inputs[0], dict(inputs[1])
    return inputs, {}


def watch_training(
    unbound_model: Any,
    *,
    inputs: Any,
    loss: Any,
    out: str | os.PathLike = "grad.repro.zip",
    max_archives: int = 1,
    on_fault: str = "continue",
    mode: str | None = None,
    note: str = "",
    allow_modules: tuple[str, ...] | list[str] = (),
    self_check: bool = True,
) -> TrainingWatch:
    """Watches a training loop: the first step whose gradients go non-finite is found and packed.

    Call `.check(grads, params=params, batch=batch)` after each step of your
    own (jitted) train step. It costs one all-finite reduction; on the first
    non-finite step, `reprokit.find(..., grad=loss)` replays that step's
    forward and backward pass from `params` and `batch` and packs the layer
    whose backward pass turned a finite cotangent into NaN/Inf, with the
    cotangent it received (`nonfinite_grad`; `reprokit run` replays it).

    Args:
      unbound_model: the model with its parameters unbound, as
        `pz.unbind_params(model, freeze=True)[0]` gives it.
      inputs: `inputs(batch)` returns the model's argument, or (argument,
        side_inputs).
      loss: `loss(output, batch)` returns the scalar loss the step
        differentiates (used in-process only, never stored).
      out: the first archive's path; later ones get -2, -3... before `.repro.zip`.
      max_archives: archives to write before the watch only counts faults.
      on_fault: "continue" (check returns False) or "raise" (`FaultDetected`
        once the archive is written).
      mode: how find runs the model: None as it is, "eager" or "jit".
      note, allow_modules, self_check: as for `reprokit.watch`.

    Returns:
      A `TrainingWatch`; `.archives` and `.faults` say what it saw.
    """
    if not callable(inputs) or not callable(loss):
        raise UsageError("watch_training needs inputs=fn(batch) and loss=fn(output, batch)")
    if on_fault not in ON_FAULT:
        raise UsageError(f"on_fault must be one of {', '.join(ON_FAULT)}, not {on_fault!r}")
    if not isinstance(max_archives, int) or isinstance(max_archives, bool) or max_archives < 1:
        raise UsageError(f"max_archives must be an integer >= 1, not {max_archives!r}")
    if not isinstance(unbound_model, pz.nn.Layer):
        raise UsageError(
            "watch_training takes the unbound model (pz.unbind_params(model, freeze=True)[0]), "
            f"not a {type(unbound_model).__name__}"
        )
    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    return TrainingWatch(
        unbound=unbound_model,
        inputs=inputs,
        loss=loss,
        out=out,
        max_archives=max_archives,
        on_fault=on_fault,
        options=PackOptions(note=note, allow_modules=tuple(allow_modules), check=self_check),
        mode=mode,
    )
