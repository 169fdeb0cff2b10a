"""Example: a NaN somewhere mid-network, found and packed with one call.

Why this exists: in a real bug hunt you do not know which layer misbehaves.
Here a llama-like transformer loaded from a "checkpoint" with one corrupted
weight (an `inf` in block 1's value projection) produces NaN logits, and
`reprokit.search` runs the model once with every layer instrumented, prints
the layer tree with each layer's status, and packs the innermost layer that
turned finite inputs into NaN: the corrupted Linear, not the blocks around it.

    python examples/find_nan.py [--out found-nan.repro.zip]

or from the shell, without knowing any keypath:

    reprokit pack examples/find_nan.py:make_call --find nonfinite --explain -o found-nan.repro.zip

Then replay with `reprokit run found-nan.repro.zip`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer.variants import llamalike_common

CORRUPTED = "transformer/block_1/attention/value.weights"
SEQ_LEN = 6


def build_model():
    """A tiny two-block llama-like transformer with one `inf` in block 1's value weights."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1,
        query_head_multiplier=2,
        embedding_dim=16,
        projection_dim=8,
        mlp_hidden_dim=32,
        num_decoder_blocks=2,
        vocab_size=32,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))

    def corrupt(param):
        if param.label != CORRUPTED:
            return param
        data = param.value.data_array
        index = (0,) * data.ndim
        bad = pz.nx.NamedArray(param.value.named_axes, data.at[index].set(jnp.inf))
        return pz.Parameter(value=bad, label=param.label)

    labels = [p.label for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence()]
    if CORRUPTED not in labels:
        raise RuntimeError(f"no parameter {CORRUPTED!r}; labels are {labels}")
    return pz.select(model).at_instances_of(pz.Parameter).apply(corrupt)


def make_call():
    """(model, tokens, side inputs) for `reprokit pack examples/find_nan.py:make_call --find ...`."""
    tokens = pz.nx.wrap(jnp.arange(1, SEQ_LEN + 1).reshape(1, SEQ_LEN), "batch", "seq")
    positions = pz.nx.wrap(jnp.arange(SEQ_LEN).reshape(1, SEQ_LEN), "batch", "seq")
    return build_model(), tokens, {"token_positions": positions}


def main() -> None:
    import reprokit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="found-nan.repro.zip")
    args = parser.parse_args()
    model, tokens, side_inputs = make_call()
    found = reprokit.search(model, tokens, side_inputs=side_inputs, check="nonfinite")
    print(found.report)
    result = found.pack(args.out, note=f"NaN logits; {CORRUPTED} holds an inf")
    print(result.summary())


if __name__ == "__main__":
    main()
