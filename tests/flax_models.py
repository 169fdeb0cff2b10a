"""Small `flax.linen` models for the Flax tests, importable as `flax_models` (the user module)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from penzai import pz
from penzai.toolshed import unflaxify


class Encoder(nn.Module):
    """Dense, then a LayerNorm over features that sit far from zero (float32 cancels)."""

    features: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features)(x) + 3000.0
        h = nn.LayerNorm()(h)
        return nn.Dense(4)(nn.gelu(h))


class Scaled(nn.Module):
    """A user layer with its own parameter: needs --allow-module flax_models to replay."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.constant(1.5), (x.shape[-1],))
        return jnp.tanh(x * scale)


class WithScaled(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Scaled()(nn.Dense(6)(x))


def encoder_call():
    """(unflaxified Encoder, its argument, the LayerNorm selection)."""
    module = Encoder()
    x = jax.random.normal(jax.random.key(0), (3, 8))
    model = unflaxify.unflaxify_apply(module, module.init(jax.random.key(1), x), x)
    selection = pz.select(model).at_subtrees_where(
        lambda layer: isinstance(layer, unflaxify.InterceptedFlaxModuleMethod)
        and isinstance(layer.module, nn.LayerNorm)
    )
    return model, unflaxify.ArgsAndKwargs.capture(x), selection


def train_step_call():
    """A Sequential of Dense, BatchNorm in training mode and Dropout: state and RNG."""
    module = nn.Sequential(
        [
            nn.Dense(8),
            nn.BatchNorm(use_running_average=False, momentum=0.5),
            nn.Dropout(0.3, deterministic=False),
        ]
    )
    x = jax.random.normal(jax.random.key(0), (4, 5))
    variables = module.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
    model = unflaxify.unflaxify_apply(
        module, variables, x, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
    )
    streams = {"dropout": pz.RandomStream.from_base_key(jax.random.key(5))}
    return model, unflaxify.ArgsAndKwargs.capture(x), {"random_streams": streams}


def scaled_call():
    module = WithScaled()
    x = jax.random.normal(jax.random.key(0), (2, 3))
    model = unflaxify.unflaxify_apply(module, module.init(jax.random.key(1), x), x)
    return model, unflaxify.ArgsAndKwargs.capture(x)
