"""Example: a llama-like transformer whose block-1 attention turns finite inputs into NaN.

Why this exists: it is the canonical reprokit story, end to end, on a real
penzai model small enough to run in seconds on a laptop CPU. The fault is
planted the way it happens in the wild: a checkpoint whose block-1 query and
key projections came back with a wrong (de)quantization scale of 1e21. The
attention layer's input is finite and so are q and k, but the logits q.k
overflow float32 to +/-inf, softmax then computes inf - inf, and the layer
returns NaN.

Two ways to pack it:

    python examples/nan_attention.py [--out attn-nan.repro.zip]

    reprokit pack examples/nan_attention.py:make_call \\
        --select 'TransformerLM.body/Sequential.sublayers[2]/TransformerBlock.sublayers[0]/Residual.delta/Sequential.sublayers[1]' \\
        -o attn-nan.repro.zip

(`reprokit pack examples/nan_attention.py:make_call --list` shows every
layer's keypath.) Then replay with `reprokit run attn-nan.repro.zip`; the
recorded issue is `nonfinite`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer.variants import llamalike_common

# The keypath of block 1's attention, as `reprokit pack ... --list` prints it.
KEYPATH = (
    "TransformerLM.body/Sequential.sublayers[2]/TransformerBlock.sublayers[0]"
    "/Residual.delta/Sequential.sublayers[1]"
)
# q and k each stay finite (~1e21) but q.k (~1e42) overflows float32 (max ~3.4e38).
BAD_SCALE = 1e21
SEQ_LEN = 6


def build_model():
    """A tiny two-block llama-like transformer with the planted fault in block 1."""
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
    attention = attention_layer(model)
    # input_to_query and input_to_key are Sequential([Linear, ApplyRoPE, ...]).
    for projection, name in [(attention.input_to_query, "query"), (attention.input_to_key, "key")]:
        weights = projection.sublayers[0].weights
        assert weights.label == f"transformer/block_1/attention/{name}.weights", weights.label
        weights.value = weights.value * BAD_SCALE
    return model


def attention_selection(model):
    """Selects block 1's `pz.nn.Attention` (the second one; block 0's is the first)."""
    return pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(1)


def attention_layer(model):
    return attention_selection(model).get()


def make_call():
    """Returns (model, tokens, side_inputs) for `reprokit pack examples/nan_attention.py:make_call`."""
    model = build_model()
    tokens = pz.nx.wrap(jnp.arange(3, 3 + SEQ_LEN).reshape(1, SEQ_LEN), "batch", "seq")
    positions = pz.nx.wrap(jnp.arange(SEQ_LEN).reshape(1, SEQ_LEN), "batch", "seq")
    return model, tokens, {"token_positions": positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="attn-nan.repro.zip", help="archive to write")
    args = parser.parse_args()

    import reprokit

    model, tokens, side_inputs = make_call()
    result = reprokit.pack(
        attention_selection(model),
        tokens,
        side_inputs=side_inputs,
        out=args.out,
        note="block 1 attention returns NaN on finite inputs (q/k weights scaled by 1e21)",
    )
    print(result.summary())


if __name__ == "__main__":
    main()
