"""Tiny real penzai models shared by the tests (seconds to build on 2 cores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models import simple_mlp
from penzai.models.transformer import sampling_mode
from penzai.models.transformer.variants import llamalike_common


def mlp(seed: int = 0):
    return simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(seed), feature_sizes=[4, 8, 8, 4]
    )


def mlp_input():
    return pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")


def dropout_mlp():
    return simple_mlp.DropoutMLP.from_config(
        name="mlp", init_base_rng=jax.random.key(1), feature_sizes=[4, 8, 4], drop_rate=0.3
    )


def llamalike(parameter_dtype=jnp.float32, *, gemma: bool = False, blocks: int = 2):
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1,
        query_head_multiplier=2,
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=16,
        num_decoder_blocks=blocks,
        vocab_size=11,
        mlp_variant="geglu_approx" if gemma else "swiglu",
        tie_embedder_and_logits=gemma,
        use_post_attn_norm=gemma,
        use_post_ffw_norm=gemma,
        parameter_dtype=parameter_dtype,
        activation_dtype=jnp.float32,
    )
    return llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))


def tokens(length: int = 5):
    return pz.nx.wrap(jnp.arange(1, length + 1).reshape(1, length) % 11, "batch", "seq")


def token_positions(length: int = 5):
    return pz.nx.wrap(jnp.arange(length).reshape(1, length), "batch", "seq")


def kv_caching(model=None):
    return sampling_mode.KVCachingTransformerLM.from_uncached(
        model if model is not None else llamalike(), cache_len=8, batch_axes={"batch": 1}
    )
