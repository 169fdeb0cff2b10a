"""Example: a finite forward pass, a NaN gradient, and the layer whose backward pass made it.

Why this exists: the most common NaN report in JAX is not in the forward
pass. Here a small classifier adds each row's L2 norm as a feature
(sqrt of a sum of squares), and the batch is zero-padded to a fixed size
with the padded rows masked out of the loss. The logits are finite, the
loss is finite, and `jax.grad` of the loss is NaN: at a padded row the norm
is sqrt(0), whose derivative is infinite, and the mask's zero cotangent
times that infinity is NaN (jax-ml/jax#3058).

This script
  1. trains with optax and `reprokit.watch_training`, which checks each
     step's gradients and, at the first padded batch, finds and packs the
     layer whose backward pass turned a finite cotangent into NaN;
  2. replays the archive (`reprokit.replay`), which runs `jax.vjp` of that
     layer alone with the cotangent recorded in the real backward pass.

    python examples/grad_nan.py [--out grad-nan.repro.zip]

or from the shell, without knowing any keypath:

    reprokit pack examples/grad_nan.py:make_call --find nonfinite \\
        --grad examples/grad_nan.py:loss_of_output --explain -o grad-nan.repro.zip

Then `reprokit run grad-nan.repro.zip` (or unzip it and run replay.py).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from penzai import pz

FEATURES, HIDDEN, CLASSES, ROWS = 4, 8, 3, 6


def _linear(name, seed, inputs, outputs):
    return pz.nn.Linear.from_config(
        name=name, init_base_rng=jax.random.key(seed), input_axes=inputs, output_axes=outputs
    )


def build_model():
    """Linear -> (x + |x| as a feature) -> Linear; |x| = sqrt(sum of squares), penzai layers only."""
    row_norm = pz.nn.Sequential(
        [
            pz.nn.Elementwise(jnp.square),
            _linear("sum_squares", 1, {"hidden": HIDDEN}, {"hidden_out": HIDDEN}),
            pz.nn.Elementwise(jnp.sqrt),
            pz.nn.RenameAxes(old="hidden_out", new="hidden"),
        ]
    )
    model = pz.nn.Sequential(
        [
            _linear("embed", 0, {"features": FEATURES}, {"hidden": HIDDEN}),
            pz.nn.BranchAndAddTogether([pz.nn.Identity(), row_norm]),
            _linear("classify", 2, {"hidden": HIDDEN}, {"classes": CLASSES}),
        ]
    )
    # The norm sums every squared feature: an all-ones matrix.
    ones = pz.select(model).at_instances_of(pz.Parameter).where(
        lambda p: p.label == "sum_squares.weights"
    )
    for param in ones.get_sequence():
        param.value = pz.nx.nmap(jnp.ones_like)(param.value)
    return model


def make_batch(seed: int, *, padded: int = 0) -> dict:
    """ROWS rows of features and labels; the last `padded` rows are zero padding, masked out."""
    key_x, key_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (ROWS, FEATURES))
    mask = jnp.arange(ROWS) < ROWS - padded
    x = jnp.where(mask[:, None], x, 0.0)
    return {
        "features": pz.nx.wrap(x, "batch", "features"),
        "labels": jax.random.randint(key_y, (ROWS,), 0, CLASSES),
        "mask": mask,
    }


def loss_fn(logits, batch):
    """Masked softmax cross-entropy: padded rows contribute nothing (and still poison the gradient)."""
    log_probs = jax.nn.log_softmax(logits.unwrap("batch", "classes"))
    picked = jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1)[:, 0]
    return -jnp.sum(jnp.where(batch["mask"], picked, 0.0)) / jnp.sum(batch["mask"])


PADDED_BATCH = make_batch(3, padded=2)


def make_call():
    """For `reprokit pack examples/grad_nan.py:make_call --find nonfinite --grad ...:loss_of_output`."""
    return build_model(), PADDED_BATCH["features"]


def loss_of_output(logits):
    """The loss `--grad` differentiates: the padded batch's loss of the model's output."""
    return loss_fn(logits, PADDED_BATCH)


def train(out: str):
    """Three optax steps; the third batch is padded. Returns the `TrainingWatch`."""
    import optax

    import reprokit

    unbound, params = pz.unbind_params(build_model(), freeze=True)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        def objective(params):
            return loss_fn(pz.bind_variables(unbound, params)(batch["features"]), batch)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    guard = reprokit.watch_training(
        unbound,
        inputs=lambda batch: batch["features"],
        loss=loss_fn,
        out=out,
    )
    batches = [make_batch(1), make_batch(2), PADDED_BATCH, make_batch(4)]
    for step, batch in enumerate(batches):
        new_params, opt_state, loss, grads = train_step(params, opt_state, batch)
        print(f"step {step}: loss {float(loss):.4f}")
        if not guard.check(grads, params=params, batch=batch):
            print(f"step {step}: non-finite gradients; packed {guard.archives[-1].path}")
            print(guard.faults[-1]["report"])
            break
        params = new_params
    return guard


def main(argv: list[str] | None = None) -> int:
    import reprokit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="grad-nan.repro.zip")
    args = parser.parse_args(argv)

    guard = train(args.out)
    if not guard.archives:
        print("no step had non-finite gradients")
        return 1
    packed = guard.archives[-1]
    print(packed.summary())
    verdict = reprokit.replay(packed.path)
    print(verdict.format())
    return 0 if verdict.reproduced else 1


if __name__ == "__main__":
    raise SystemExit(main())
