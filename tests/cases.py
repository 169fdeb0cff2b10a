"""Real penzai models and the layers the round-trip tests isolate in them."""

from __future__ import annotations

import custom_layers
import jax
import jax.numpy as jnp
import models
from penzai import pz
from penzai.models.transformer import model_parts


def _nth(model, cls, n=0):
    return pz.select(model).at_instances_of(cls).pick_nth_selected(n)


def _llama_cases(prefix, model):
    side = {"token_positions": models.token_positions()}
    toks = models.tokens()
    return {
        f"{prefix}-linear": (_nth(model, pz.nn.Linear, 3), toks, side),
        f"{prefix}-attention": (_nth(model, pz.nn.Attention, 1), toks, side),
        f"{prefix}-norm": (_nth(model, pz.nn.RMSLayerNorm, 0), toks, side),
        f"{prefix}-block": (_nth(model, model_parts.TransformerBlock, 0), toks, side),
    }


def kv_cache_case():
    model = models.kv_caching()
    return _nth(model, pz.nn.KVCachingAttention, 1), models.tokens(3), {}


def custom_case():
    base = models.mlp()
    layer = custom_layers.ScaledClip(
        scale=pz.Parameter(value=jnp.asarray(2.5), label="clip.scale"), axis="features"
    )
    model = pz.nn.Sequential([base, layer])
    return _nth(model, custom_layers.ScaledClip), models.mlp_input(), {}


def all_cases():
    """name -> (selection, argument, side_inputs)."""
    mlp = models.mlp()
    dropout = models.dropout_mlp()
    cases = {
        "mlp-linear": (_nth(mlp, pz.nn.Linear, 1), models.mlp_input(), {}),
        "mlp-whole": (pz.select(mlp).at_keypaths([()]), models.mlp_input(), {}),
        "dropout": (
            _nth(dropout, pz.nn.StochasticDropout),
            models.mlp_input(),
            {"random_stream": pz.RandomStream.from_base_key(jax.random.key(7))},
        ),
    }
    cases.update(_llama_cases("llama", models.llamalike()))
    cases.update(_llama_cases("gemma-bf16", models.llamalike(jnp.bfloat16, gemma=True)))
    cases["kv-cache"] = kv_cache_case()
    cases["custom"] = custom_case()
    return cases


def gemma_attention_case():
    """Only the gemma-like bf16 attention case (cheaper than building every case)."""
    return _llama_cases("gemma-bf16", models.llamalike(jnp.bfloat16, gemma=True))["gemma-bf16-attention"]
