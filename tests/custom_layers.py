"""A user-defined penzai layer living outside penzai, for --allow-module tests."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from penzai import pz


def soft_clip(x):
    return 3.0 * jnp.tanh(x / 3.0)


@pz.pytree_dataclass
class ScaledClip(pz.nn.Layer):
    """Multiplies by a learned scale, then soft-clips: a layer penzai does not ship."""

    scale: pz.nn.ParameterLike
    axis: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        return pz.nx.nmap(soft_clip)(x * self.scale.value)


@pz.pytree_dataclass
class RaisesOnLongSequences(pz.nn.Layer):
    """Raises a shape error when the sequence is longer than `limit` (a planted bug)."""

    limit: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        if x.named_shape["seq"] > self.limit:
            raise ValueError(f"sequence length {x.named_shape['seq']} exceeds limit {self.limit}")
        return x


@pz.pytree_dataclass
class Repeat(pz.nn.Layer):
    """Calls its body `times` times in a row, so one selected layer sees several calls."""

    body: pz.nn.Layer
    times: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        for _ in range(self.times):
            x = self.body(x, **side_inputs)
        return x


@pz.pytree_dataclass
class HostNoise(pz.nn.Layer):
    """Adds host-side randomness from numpy's global RNG: nondeterministic on purpose."""

    def __call__(self, x, /, **side_inputs):
        import numpy as np

        return x + float(np.random.rand())
