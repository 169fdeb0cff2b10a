"""Example: an MLP whose middle `pz.nn.Linear` was loaded from a checkpoint with the wrong input size.

Why this exists: it shows reprokit packing a layer that raises instead of
returning bad numbers, on a real penzai model (`simple_mlp.MLP`). The fault is
planted the way it happens in the wild: the checkpoint's
`mlp/Affine_1/Linear.weights` was exported from a pruned variant whose first
hidden layer kept 6 of its 8 units, and nothing checks shapes on load. The
model builds fine; the first call fails inside that Linear, whose weights
expect 6 input features while the activations carry 8. The recorded issue is
`exception`.

Two ways to pack it:

    python examples/shape_error.py [--out shape-error.repro.zip]

    reprokit pack examples/shape_error.py:make_call \\
        --select 'MLP.sublayers[2]/Affine.sublayers[0]' -o shape-error.repro.zip

(`reprokit pack examples/shape_error.py:make_call --list` shows every
layer's keypath.) Then replay with `reprokit run shape-error.repro.zip`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models import simple_mlp

# The keypath of the broken Linear, as `reprokit pack ... --list` prints it.
KEYPATH = "MLP.sublayers[2]/Affine.sublayers[0]"
FEATURE_SIZES = [4, 8, 8, 4]
BAD_LABEL = "mlp/Affine_1/Linear.weights"


def fake_checkpoint() -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """label -> (array, axis names), as a checkpoint loader would hand them over.

    Every entry matches the architecture except `BAD_LABEL`, which has 6
    input rows instead of 8.
    """
    rng = np.random.default_rng(0)
    sizes = FEATURE_SIZES
    checkpoint = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        rows = 6 if f"mlp/Affine_{i}/Linear.weights" == BAD_LABEL else n_in
        weights = rng.normal(scale=n_in**-0.5, size=(rows, n_out)).astype(np.float32)
        checkpoint[f"mlp/Affine_{i}/Linear.weights"] = (weights, ("features", "features_out"))
        checkpoint[f"mlp/Affine_{i}/AddBias.bias"] = (np.zeros(n_out, np.float32), ("features",))
    return checkpoint


def build_model():
    """Builds the MLP and loads `fake_checkpoint()` into it, trusting the shapes as found."""
    model = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=FEATURE_SIZES
    )
    checkpoint = fake_checkpoint()
    for param in pz.unbind_params(model)[1]:
        array, names = checkpoint[param.label]
        param.value = pz.nx.wrap(jnp.asarray(array), *names)
    return model


def linear_selection(model):
    """Selects the second `pz.nn.Linear` (inside `mlp/Affine_1`), the one with bad weights."""
    return pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(1)


def make_call():
    """Returns (model, inputs) for `reprokit pack examples/shape_error.py:make_call`."""
    inputs = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    return build_model(), inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="shape-error.repro.zip", help="archive to write")
    args = parser.parse_args()

    import reprokit

    model, inputs = make_call()
    result = reprokit.pack(
        linear_selection(model),
        inputs,
        out=args.out,
        note=f"{BAD_LABEL} came from a pruned checkpoint: 6 input rows, activations have 8",
    )
    print(result.summary())


if __name__ == "__main__":
    main()
