"""Models whose forward pass is finite and whose gradient is NaN, for the gradient tests.

They live in their own module so archives that hold them replay with
`--allow-module grad_layers` (the tests put this folder on PYTHONPATH).
Each fault is one seen in the wild: the gradient of `sqrt` at zero behind a
square (jax-ml/jax#3058), the `jnp.where` trap, and a norm at a zero
(padding) row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer.variants import llamalike_common


def where_sqrt(x):
    """`sqrt` guarded by `jnp.where`: finite forward at 0, NaN gradient (the untaken branch)."""
    return jnp.where(x > 0, jnp.sqrt(x), 0.0)


def _linear(name: str, seed: int, inputs: dict, outputs: dict):
    return pz.nn.Linear.from_config(
        name=name, init_base_rng=jax.random.key(seed), input_axes=inputs, output_axes=outputs
    )


def sqrt_model():
    """Linear -> square -> sqrt -> Linear: |Wx| with a NaN gradient where a row of x is zero."""
    return pz.nn.Sequential(
        [
            _linear("first", 0, {"features": 3}, {"hidden": 4}),
            pz.nn.Elementwise(jnp.square),
            pz.nn.Elementwise(jnp.sqrt),
            _linear("second", 1, {"hidden": 4}, {"out": 2}),
        ]
    )


def where_model():
    """Linear -> where(x > 0, sqrt(x), 0) -> Linear."""
    return pz.nn.Sequential(
        [
            _linear("first", 0, {"features": 3}, {"hidden": 4}),
            pz.nn.Elementwise(jnp.square),
            pz.nn.Elementwise(where_sqrt),
            _linear("second", 1, {"hidden": 4}, {"out": 2}),
        ]
    )


def rows(*, zero_row: bool = True):
    """Two rows of three features; the second all zeros (padding) unless `zero_row` is False."""
    data = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0] if zero_row else [0.5, -1.0, 2.0]])
    return pz.nx.wrap(data, "batch", "features")


def squared_loss(output):
    """The loss the tests differentiate: mean of squares of the model's output."""
    return jnp.mean(jnp.square(output.unwrap(*output.named_shape)))


@pz.pytree_dataclass
class UnitNorm(pz.nn.Layer):
    """x / max(|x|, 1e-6) over `axis`: finite at a zero row, its gradient there is NaN."""

    axis: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        def normalize(v):
            return v / jnp.maximum(jnp.linalg.norm(v), 1e-6)

        return pz.nx.nmap(normalize)(x.untag(self.axis)).tag(self.axis)


def llamalike_with_pad_row(*, blocks: int = 2, layer_stack: bool = False):
    """A tiny llama-like LM whose padding token embeds to zeros and whose block 0 norm is `UnitNorm`."""
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1,
        query_head_multiplier=2,
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=16,
        num_decoder_blocks=blocks,
        vocab_size=11,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
        use_layer_stack=layer_stack,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    table = pz.select(model).at_instances_of(pz.nn.EmbeddingTable).get_sequence()[0]
    names = tuple(table.embeddings.value.named_shape)
    data = table.embeddings.value.unwrap(*names)
    table.embeddings.value = pz.nx.wrap(data.at[0].set(0.0), *names)  # token 0: padding
    if not layer_stack:
        norm = pz.select(model).at_instances_of(pz.nn.RMSLayerNorm).pick_nth_selected(0)
        model = norm.set(UnitNorm(axis="embedding"))
    else:
        model = pz.select(model).at_instances_of(pz.nn.RMSLayerNorm).apply(
            lambda _: UnitNorm(axis="embedding")
        )
    return model


def padded_tokens(length: int = 5):
    """One sequence whose last two tokens are padding (token 0)."""
    tokens = jnp.array([[3, 5, 7, 0, 0]])[:, :length]
    return pz.nx.wrap(tokens, "batch", "seq")


def positions(length: int = 5):
    return pz.nx.wrap(jnp.arange(length).reshape(1, length), "batch", "seq")


def logits_loss(logits):
    """Mean squared logits: enough to push a cotangent through every position."""
    return jnp.mean(jnp.square(logits.unwrap(*logits.named_shape)))


@jax.custom_vjp
def fragile_double(x):
    """2x with a custom VJP that raises: the forward pass runs, the backward pass fails."""
    return 2.0 * x


def _fragile_forward(x):
    return 2.0 * x, None


def _fragile_backward(_, cotangent):
    raise ValueError("fragile_double has no backward rule here")


fragile_double.defvjp(_fragile_forward, _fragile_backward)


def fragile_model():
    """Linear -> fragile_double (raises in its backward pass) -> Linear."""
    return pz.nn.Sequential(
        [
            _linear("first", 0, {"features": 3}, {"hidden": 4}),
            pz.nn.Elementwise(fragile_double),
            _linear("second", 1, {"hidden": 4}, {"out": 2}),
        ]
    )
