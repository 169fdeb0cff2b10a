"""Penzai submodels of a chosen byte size, built fast, for the storage benchmarks.

What a user packs is a real penzai layer: a few large matrices (some in
bfloat16), a couple of hundred small leaves (biases), and a typed PRNG key
(here in the `RandomStream` side input of a dropout layer). Initialising a
1 GiB model with jax's initializers would take longer than the benchmark
itself, so the weights are copies of one 16 MiB block of Gaussian noise:
the period is far beyond any codec's window, so the bytes still compress
like real float noise, and filling costs a `memcpy`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from penzai import pz

__all__ = ["Case", "build_case", "build_leafy", "fill_special", "record_arrays"]

_BLOCK_ELEMENTS = 4 * 2**20  # 16 MiB of float32
_LARGE_F32 = 3  # large float32 matrices
_LARGE_BF16 = 1  # large bfloat16 matrices


class Case:
    """A model, its call, and the selection `reprokit.pack` takes."""

    def __init__(self, name: str, model: Any, argument: Any, side_inputs: dict):
        self.name = name
        self.model = model
        self.argument = argument
        self.side_inputs = side_inputs

    def selection(self) -> Any:
        """The whole model (keypath ()) as a one-layer selection."""
        return pz.select(self.model).at_keypaths([()])


def _noise(count: int, dtype: Any, scale: float, rng: np.random.Generator) -> np.ndarray:
    """`count` values of N(0, scale²) as `dtype`, tiled from one 16 MiB block."""
    block = (rng.standard_normal(min(count, _BLOCK_ELEMENTS), dtype=np.float32) * scale).astype(
        dtype
    )
    out = np.empty(count, dtype=dtype)
    for start in range(0, count, len(block)):
        part = out[start : start + len(block)]
        part[:] = block[: len(part)]
    return out


def _param(values: np.ndarray, names: tuple[str, ...], label: str) -> pz.Parameter:
    array = jax.device_put(values)
    return pz.Parameter(value=pz.nx.wrap(array, *names), label=label)


def _dim_for(total_bytes: int, small_leaves: int, bf16: bool) -> int:
    """Matrix side D so that the large matrices and biases hold about `total_bytes`."""
    per_d2 = 4 * _LARGE_F32 + (2 if bf16 else 4) * _LARGE_BF16
    d = int(math.sqrt(total_bytes / per_d2))
    # Biases (D each) take a little; shrink D to leave room, keep it a multiple of 8.
    d = int(d * (1 - 4 * small_leaves / (per_d2 * d)) // 8 * 8)
    return max(d, 8)


def build_case(
    total_bytes: int, *, small_leaves: int = 200, seed: int = 0, bf16: bool = True
) -> Case:
    """A `Sequential` of a few D×D `Linear`s (one bf16), `small_leaves` biases and a dropout.

    Leaves: 4 large matrices, `small_leaves` biases of D values (every fourth
    bf16), the dropout's typed PRNG key and the input; about `total_bytes` in
    all. `bf16=False` makes every leaf float32.
    """
    rng = np.random.default_rng(seed)
    d = _dim_for(total_bytes, small_leaves, bf16)
    large = _LARGE_F32 + _LARGE_BF16
    axes = ("a", "b")
    layers: list[Any] = []
    per_matrix = [small_leaves // large + (i < small_leaves % large) for i in range(large)]
    bias_index = 0
    for i in range(large):
        dtype = ml_dtypes.bfloat16 if bf16 and i >= _LARGE_F32 else np.float32
        src, dst = axes[i % 2], axes[(i + 1) % 2]
        weights = _noise(d * d, dtype, 1 / math.sqrt(d), rng).reshape(d, d)
        layers.append(
            pz.nn.Linear(
                weights=_param(weights, (src, dst), f"linear{i}.weights"),
                in_axis_names=(src,),
                out_axis_names=(dst,),
            )
        )
        del weights
        for _ in range(per_matrix[i]):
            bias_dtype = ml_dtypes.bfloat16 if bf16 and bias_index % 4 == 3 else np.float32
            bias = _noise(d, bias_dtype, 0.01, rng)
            layers.append(
                pz.nn.AddBias(bias=_param(bias, (dst,), f"bias{bias_index}"), new_axis_names=())
            )
            bias_index += 1
    layers.append(pz.nn.StochasticDropout(drop_rate=0.1, share_across_axes=()))
    model = pz.nn.Sequential(layers)
    argument = pz.nx.wrap(
        jnp.asarray(_noise(2 * d, np.float32, 1.0, rng).reshape(2, d)), "batch", "a"
    )
    side = {"random_stream": pz.RandomStream.from_base_key(jax.random.key(seed))}
    return Case(f"{total_bytes / 2**20:.0f}MiB", model, argument, side)


def build_leafy(leaves: int, *, leaf_values: int = 256, seed: int = 0) -> Case:
    """A `Sequential` of `leaves` small biases (`leaf_values` float32 each, 1 KiB by default)."""
    rng = np.random.default_rng(seed)
    layers = [
        pz.nn.AddBias(
            bias=_param(_noise(leaf_values, np.float32, 0.01, rng), ("a",), f"bias{i}"),
            new_axis_names=(),
        )
        for i in range(leaves)
    ]
    model = pz.nn.Sequential(layers)
    argument = pz.nx.wrap(jnp.ones((2, leaf_values), jnp.float32), "batch", "a")
    return Case(f"{leaves}leaves", model, argument, {})


def fill_special(case: Case, pattern: str) -> Case:
    """The same model with its large matrices replaced: "nan" (all NaN) or "sparse" (99% zeros)."""
    from penzai.core import selectors

    rng = np.random.default_rng(1)

    def replace(linear: Any) -> Any:
        value = linear.weights.value
        shape, dtype = value.data_array.shape, value.data_array.dtype
        if pattern == "nan":
            values = np.full(shape, np.nan, dtype=dtype)
        else:
            values = np.zeros(shape, dtype=dtype)
            flat = values.reshape(-1)
            hits = rng.integers(0, flat.size, flat.size // 100)
            flat[hits] = rng.standard_normal(len(hits)).astype(dtype)
        names = value.named_axes.keys()
        return type(linear)(
            weights=_param(values, tuple(names), linear.weights.label),
            in_axis_names=linear.in_axis_names,
            out_axis_names=linear.out_axis_names,
        )

    model = selectors.select(case.model).at_instances_of(pz.nn.Linear).apply(replace)
    return Case(f"{case.name}-{pattern}", model, case.argument, case.side_inputs)


def record_arrays(record: Any) -> list[np.ndarray]:
    """Every array leaf of a captured call, as numpy views of its bytes (keys as key data)."""
    from reprokit.capture._write import _record_parts
    from reprokit.portable._arrays import describe

    seen: dict[int, np.ndarray] = {}
    for leaf in jax.tree_util.tree_leaves(_record_parts(record)):
        if isinstance(leaf, (jax.Array, np.ndarray)) and id(leaf) not in seen:
            seen[id(leaf)] = describe(leaf)[1]
    return list(seen.values())
