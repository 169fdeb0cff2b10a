"""Example: a KV-cache decoding loop, watched until the step that fails.

Why this exists: many bugs only show up deep in a real loop, with state that
took many steps to build (here a key/value cache). `reprokit.watch` wraps the
model; the loop runs unchanged, and the first call that returns NaN/Inf is
packed on the spot with that call's exact inputs and cache state, then the
loop goes on.

The planted fault: one row of the embedding table (token 7) was corrupted to
`inf` in the "checkpoint", so decoding is fine until token 7 is fed in.

    python examples/watch_decoding.py [--out decode-step.repro.zip]

Then replay with `reprokit run decode-step.repro.zip`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer import sampling_mode
from penzai.models.transformer.variants import llamalike_common

BAD_TOKEN = 7
STEPS = 12


def build_model():
    """A tiny llama-like transformer in KV-cache decoding mode, with token 7's embedding corrupted."""
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
        if param.label != "transformer/embedder.embeddings":
            return param
        table = param.value
        bad = pz.nx.NamedArray(table.named_axes, table.data_array.at[BAD_TOKEN].set(jnp.inf))
        return pz.Parameter(value=bad, label=param.label)

    model = pz.select(model).at_instances_of(pz.Parameter).apply(corrupt)
    return sampling_mode.KVCachingTransformerLM.from_uncached(
        model, cache_len=STEPS + 1, batch_axes={"batch": 1}
    )


def main() -> None:
    import reprokit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="decode-step.repro.zip")
    args = parser.parse_args()
    watched = reprokit.watch(build_model(), out=args.out, check="nonfinite")
    for step in range(STEPS):
        token = pz.nx.wrap(
            jnp.full((1, 1), step + 1), "batch", "seq"
        )  # teacher-forced tokens 1, 2, ...
        logits = watched(token)
        finite = bool(jnp.isfinite(logits.data_array).all())
        print(f"step {step:2d}: token {step + 1:2d}, logits {'finite' if finite else 'NON-FINITE'}")
    for result in watched.archives:
        print(result.summary())


if __name__ == "__main__":
    main()
