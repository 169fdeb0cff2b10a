"""Benchmark: what `reprokit.find(..., grad=loss)` costs, as a ratio to one plain `jax.grad` step.

Why this exists: the gradient search promises one instrumented `jax.grad`
pass, at most 3x one plain `jax.grad` step of the same model (issue 14).
Both sides are measured here, in the same process, on the same model and
inputs, so the ratio holds on whatever machine runs this.

    python benchmarks/bench_grad.py

Prints, for a tiny llama-like transformer (penzai's llamalike_common) with
a padding token that embeds to zeros and a sqrt(x^2) in front of block 0's
first norm (a finite forward pass, NaN gradients):
  * eager model: one warm plain `jax.grad` step (best of 3) and one search
    (its own first call: it builds and instruments the model each time);
  * the same model under penzai's `Jitted`: first calls, both compiling.
Not a test; bounded to well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

import reprokit

if __package__ in (None, ""):  # `python benchmarks/bench_grad.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_find_watch import build as tiny_llamalike  # noqa: E402

SEQ = 16


def build(blocks: int = 3):
    """The transformer with the gradient fault planted."""
    model = tiny_llamalike(blocks)
    table = pz.select(model).at_instances_of(pz.nn.EmbeddingTable).get_sequence()[0]
    data = table.embeddings.value.unwrap("vocabulary", "embedding")
    table.embeddings.value = pz.nx.wrap(data.at[0].set(0.0), "vocabulary", "embedding")
    first_norm = pz.select(model).at_instances_of(pz.nn.RMSLayerNorm).pick_nth_selected(0)
    return first_norm.apply(
        lambda norm: pz.nn.Sequential(
            [pz.nn.Elementwise(jnp.square), pz.nn.Elementwise(jnp.sqrt), norm]
        )
    )


def inputs():
    """A sequence whose last quarter is padding (token 0)."""
    tokens = jnp.where(jnp.arange(SEQ) < 3 * SEQ // 4, jnp.arange(SEQ) % 31 + 1, 0)
    tokens = pz.nx.wrap(tokens.reshape(1, SEQ), "batch", "seq")
    positions = pz.nx.wrap(jnp.arange(SEQ).reshape(1, SEQ), "batch", "seq")
    return tokens, {"token_positions": positions}


def loss(logits):
    return jnp.mean(jnp.square(logits.unwrap("batch", "seq", "vocabulary")))


def plain_grad(model, tokens, side):
    """One plain `jax.grad` step of the loss w.r.t. the parameters (the reporter's own step)."""
    unbound, params = pz.unbind_params(model, freeze=True)

    def objective(params):
        return loss(pz.bind_variables(unbound, params)(tokens, **side))

    return jax.grad(objective)(params)


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def search(model, tokens, side):
    return reprokit.search(model, tokens, side_inputs=side, grad=loss).call_index


def main() -> None:
    start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    tokens, side = inputs()
    model = build()
    timed(lambda: plain_grad(model, tokens, side))  # warm eager dispatch caches
    plain = min(timed(lambda: plain_grad(model, tokens, side)) for _ in range(3))
    found = min(timed(lambda: search(model, tokens, side)) for _ in range(2))
    print(
        f"find(grad=), eager model: plain jax.grad step {plain * 1e3:.0f} ms, "
        f"find {found * 1e3:.0f} ms, ratio {found / plain:.2f}x (goal <= 3x)"
    )
    result = reprokit.search(model, tokens, side_inputs=side, grad=loss)
    print(f"  culprit: {result.keypath}")

    first, second = Jitted(build()), Jitted(build())  # built (and initialised) untimed
    cold_plain = timed(lambda: plain_grad(first, tokens, side))
    cold_find = timed(lambda: search(second, tokens, side))
    print(
        f"find(grad=), Jitted model (both compile): plain first jax.grad step "
        f"{cold_plain * 1e3:.0f} ms, find {cold_find * 1e3:.0f} ms, "
        f"ratio {cold_find / cold_plain:.2f}x"
    )
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
