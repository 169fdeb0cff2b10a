"""find follows the NaN: an intentional -inf mask is context, the Softmax that made NaN is blamed.

The real bug report: a causal mask whose `masked_out_value` is -inf and a
left-padded batch. The padding queries see no key at all, the mask fills
their rows with -inf (as designed) and the Softmax turns each fully masked
row into NaN, which is what the user saw in the logits.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import models
import pytest
from penzai import pz

import reprokit


def _minus_inf_mask_model():
    model = models.llamalike()
    return (
        pz.select(model)
        .at_instances_of(pz.nn.ApplyCausalAttentionMask)
        .apply(lambda m: dataclasses.replace(m, masked_out_value=jnp.array(-jnp.inf, jnp.float32)))
    )


def _left_padded():
    tokens = pz.nx.wrap(jnp.array([[1, 2, 3, 4, 5], [0, 0, 6, 7, 8]]), "batch", "seq")
    # Padding gets position -1: the causal mask hides every key from it.
    positions = pz.nx.wrap(jnp.array([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]]), "batch", "seq")
    return tokens, {"token_positions": positions}


def test_the_softmax_that_makes_nan_is_the_culprit_not_the_mask():
    model = _minus_inf_mask_model()
    tokens, sides = _left_padded()
    logits = model(tokens, **sides)
    assert bool(jnp.isnan(logits.data_array).any())  # what the user saw
    found = reprokit.search(model, tokens, side_inputs=sides)
    assert found.layer_type.endswith("Softmax"), found.report
    assert found.found_by["rule"] == "nan"
    producers = found.found_by["inf_producers"]
    assert producers and producers[0]["type"].endswith("ApplyCausalAttentionMask")
    assert producers[0]["neginf"] > 0 and producers[0]["posinf"] == 0
    assert "context:" in found.report and "<== culprit" in found.report
    assert f"turned them into {found.found_by['returned']['nan']} NaN" in found.report


def test_check_inf_still_blames_the_first_inf_producer():
    model = _minus_inf_mask_model()
    tokens, sides = _left_padded()
    found = reprokit.search(model, tokens, side_inputs=sides, check="inf")
    assert found.layer_type.endswith("ApplyCausalAttentionMask"), found.report
    assert found.found_by["rule"] == "nonfinite"


def test_a_nan_free_inf_is_still_found_by_nonfinite():
    # No NaN in the output: the first layer returning Inf from finite inputs is blamed.
    model = pz.nn.Sequential([models.mlp(), pz.nn.Elementwise(lambda x: jnp.exp(x * 1e3))])
    found = reprokit.search(model, models.mlp_input())
    assert found.layer_type.endswith("Elementwise"), found.report
    assert found.found_by["rule"] == "nonfinite"


@pytest.mark.parametrize("check", ["nonfinite", "inf"])
def test_the_culprit_packs_and_reproduces(tmp_path, check):
    model = _minus_inf_mask_model()
    tokens, sides = _left_padded()
    found = reprokit.search(model, tokens, side_inputs=sides, check=check)
    result = found.pack(tmp_path / f"{check}.repro.zip", quiet=True)
    assert result.self_check["reproduced"] is True
    assert result.signature["kind"] == "nonfinite"
