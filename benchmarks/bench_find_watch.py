"""Benchmark: what `reprokit.find` and `reprokit.watch` cost, as ratios measured in one run.

Why this exists: `find` promises one instrumented forward pass, and
`watch` promises to stay out of the way of a training or decoding loop
(goal: < 10% on a tiny transformer forward pass under jit). Both claims are
ratios to the plain model measured here, in the same process, on the same
inputs, so they hold on whatever machine runs this.

    python benchmarks/bench_find_watch.py

Prints, for a tiny llama-like transformer (penzai's llamalike_common):
  * find's wall time over one plain forward pass (eager model: warm plain
    pass; model under penzai's Jitted: first calls, both compiling);
  * watch's per-step time over the plain step, steady state under Jitted
    (interleaved rounds, median of the per-round ratios), for a watched
    whole model and for one watched layer.
Not a test; bounded to well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer.variants import llamalike_common
from penzai.toolshed.jit_wrapper import Jitted

import reprokit

SEQ = 16


def build(blocks: int = 3):
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1,
        query_head_multiplier=2,
        embedding_dim=16,
        projection_dim=8,
        mlp_hidden_dim=32,
        num_decoder_blocks=blocks,
        vocab_size=32,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
    )
    return llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))


def inputs():
    tokens = pz.nx.wrap(jnp.arange(SEQ).reshape(1, SEQ) % 32, "batch", "seq")
    positions = pz.nx.wrap(jnp.arange(SEQ).reshape(1, SEQ), "batch", "seq")
    return tokens, {"token_positions": positions}


def plant_inf(model, block: int = 1):
    """An Inf in block `block`'s query projection weights: find has something to find."""
    attention = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(block).get()
    weights = attention.input_to_query.sublayers[0].weights
    names = tuple(weights.value.named_shape)
    data = weights.value.unwrap(*names)
    weights.value = pz.nx.wrap(data.at[(0,) * len(names)].set(jnp.inf), *names)


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_find() -> None:
    tokens, side = inputs()
    model = build()
    plant_inf(model)
    timed(lambda: model(tokens, **side))  # warm eager dispatch caches
    plain = min(timed(lambda: model(tokens, **side)) for _ in range(3))
    found = timed(lambda: reprokit.search(model, tokens, side_inputs=side).selection.count())
    print(
        f"find, eager model: plain forward {plain * 1e3:.0f} ms, find {found * 1e3:.0f} ms, "
        f"ratio {found / plain:.1f}x"
    )

    jitted = Jitted(build())
    plant_inf(jitted.body)
    cold_plain = timed(lambda: jitted(tokens, **side))
    cold_find = timed(lambda: reprokit.search(jitted, tokens, side_inputs=side).selection.count())
    print(
        f"find, Jitted model (both compile): plain first call {cold_plain * 1e3:.0f} ms, "
        f"find {cold_find * 1e3:.0f} ms, ratio {cold_find / cold_plain:.1f}x"
    )

    healthy = build()
    timed(lambda: healthy(tokens, **side))
    plain = min(timed(lambda: healthy(tokens, **side)) for _ in range(3))
    start = time.perf_counter()
    try:
        reprokit.search(healthy, tokens, side_inputs=side, check="mismatch")
    except reprokit.CaptureError:
        pass  # a healthy model: nothing exceeds the tolerance
    mismatch = time.perf_counter() - start
    print(
        f"find check=mismatch (model + float64 reference pass), eager model: "
        f"{mismatch * 1e3:.0f} ms, ratio {mismatch / plain:.1f}x"
    )


def per_step(model, tokens, side, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        out = model(tokens, **side)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def bench_watch() -> None:
    tokens, side = inputs()
    plain = Jitted(build())
    whole = reprokit.watch(plain, out="unused.repro.zip")
    attention = pz.select(plain).at_instances_of(pz.nn.Attention).pick_nth_selected(1)
    one = reprokit.watch(attention, out="unused.repro.zip")
    variants = {"plain": plain, "watch(model)": whole, "watch(one layer)": one}
    for model in variants.values():
        per_step(model, tokens, side, 20)  # compile and warm up
    steps, rounds = 40, 31
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            times[name].append(per_step(model, tokens, side, steps))
    base = statistics.median(times["plain"])
    print(f"watch, tiny transformer under Jitted: plain step {base * 1e6:.0f} us")
    for name in ("watch(model)", "watch(one layer)"):
        ratios = [w / p for w, p in zip(times[name], times["plain"], strict=True)]
        print(
            f"  {name:18} step {statistics.median(times[name]) * 1e6:.0f} us, "
            f"overhead ratio {statistics.median(ratios):.3f} (median of {rounds} rounds)"
        )
    assert not whole.archives and not one.archives


def main() -> None:
    start = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    bench_find()
    bench_watch()
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
