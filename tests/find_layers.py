"""Layers with planted faults for the find and watch tests.

They live in their own module so archives that hold them replay with
`--allow-module find_layers` (the tests put this folder on PYTHONPATH).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from penzai import pz
from penzai.nn.linear_and_affine import contract


@pz.pytree_dataclass
class RaisesAtLength(pz.nn.Layer):
    """Raises for exactly one sequence length, like a kernel missing one bucket."""

    length: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        if x.named_shape["seq"] == self.length:
            raise ValueError(f"no kernel for sequence length {self.length}")
        return x


@pz.pytree_dataclass
class LowPrecisionLinear(pz.nn.Layer):
    """A Linear that contracts in `compute_dtype` (bf16) where it should accumulate in f32."""

    weights: pz.nn.ParameterLike
    in_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    compute_dtype: Any = dataclasses.field(default=jnp.bfloat16, metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        low = x.astype(self.compute_dtype)
        weights = self.weights.value.astype(self.compute_dtype)
        return contract(self.in_axis_names, low, weights).astype(x.dtype)


@pz.pytree_dataclass
class FailsAtStep(pz.nn.Layer):
    """Divides by (fail_at - step): Inf at exactly one step; the step lives in state."""

    step: pz.StateVariable
    fail_at: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        step = self.step.value
        self.step.value = step + 1
        return x / (self.fail_at - step).astype(x.dtype)
