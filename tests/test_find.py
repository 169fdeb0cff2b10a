"""`reprokit.find`/`search`: the culprit is found in one pass, on real tiny models, and packs.

Faults are planted the way they happen in the wild: an Inf in one
projection's weights (a corrupted checkpoint), a layer that raises for one
sequence length, a layer that computes in bf16 where it should accumulate
in f32. Each test asserts the exact layer, not just "something was found".
"""

from __future__ import annotations

import dataclasses
import textwrap

import find_layers
import jax
import jax.numpy as jnp
import models
import pytest
from conftest import run_json, run_reprokit
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import llamalike_common
from penzai.toolshed.jit_wrapper import Jitted

import reprokit
from reprokit import CaptureError, UsageError


def _side(length: int = 5) -> dict:
    return {"token_positions": models.token_positions(length)}


def _plant_inf(attention, *, stacked_block: int | None = None):
    """An Inf in one entry of an attention's query projection; returns that Linear."""
    linear = attention.input_to_query.sublayers[0]
    weights = linear.weights
    names = tuple(weights.value.named_shape)
    index = [0] * len(names)
    if stacked_block is not None:
        index[names.index("blocks")] = stacked_block
    data = weights.value.unwrap(*names)
    weights.value = pz.nx.wrap(data.at[tuple(index)].set(jnp.inf), *names)
    return linear


def _keypath_of(model, layer):
    (path,) = pz.select(model).at_subtrees_where(lambda x: x is layer).selected_by_path
    return path


@pytest.fixture(scope="module")
def three_blocks():
    return models.llamalike(blocks=3)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_inf_in_block_k_attention_is_found_exactly_and_replays(tmp_path, block):
    model = models.llamalike(blocks=3)
    attention = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(block).get()
    faulty = _plant_inf(attention)

    selection = reprokit.find(model, models.tokens(), side_inputs=_side())

    assert selection.count() == 1 and selection.get() is faulty
    assert list(selection.selected_by_path) == [_keypath_of(model, faulty)]
    result = reprokit.search(model, models.tokens(), side_inputs=_side())
    assert result.keypath.startswith(f"TransformerLM.body/Sequential.sublayers[{block + 1}]/")
    assert result.found_by["nonfinite_parameters"] == [
        {
            "label": f"transformer/block_{block}/attention/query.weights",
            "nan": 0,
            "posinf": 1,
            "neginf": 0,
        }
    ]
    out = tmp_path / f"block{block}.repro.zip"
    packed = result.pack(out, check=False)
    assert packed.signature["kind"] == "nonfinite"
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["reproduced"] is True
    manifest = reprokit.load(out).manifest
    assert manifest["found_by"]["check"] == "nonfinite"
    assert manifest["layer"]["keypath"] == result.keypath


def test_report_shows_the_tree_and_marks_the_culprit(capsys):
    model = models.llamalike(blocks=3)
    attention = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(1).get()
    _plant_inf(attention)
    selection = reprokit.find(model, models.tokens(), side_inputs=_side(), report=True)
    printed = capsys.readouterr().out
    keystr = pz.pretty_keystr(next(iter(selection.selected_by_path)), model)
    assert f"culprit: {keystr}" in printed
    assert "non-finite parameter: transformer/block_1/attention/query.weights (1 +Inf)" in printed
    culprit_lines = [line for line in printed.splitlines() if "<== CULPRIT" in line]
    assert len(culprit_lines) == 1 and "Linear" in culprit_lines[0]
    assert "finite" in culprit_lines[0] and "+Inf" in culprit_lines[0]
    # Every layer appears, with the segments pz.pretty_keystr writes.
    assert ".sublayers[0]: EmbeddingLookup" in printed
    assert printed.count("(contains the culprit)") >= 5


def test_a_composite_culprit_says_why_no_sublayer_alone_was_chosen(tmp_path):
    # Residual's own sum overflows (3e38 + 3e38); its Identity delta behaves.
    model = pz.nn.Sequential([pz.nn.Residual(delta=pz.nn.Identity())])
    result = reprokit.search(model, jnp.full((2, 4), 3e38))
    assert result.keypath == "Sequential.sublayers[0]" and result.found_by["sublayer_calls"] == 1
    assert "inside it: 1 sublayer call(s), each of which behaved" in result.report
    out = tmp_path / "residual.repro.zip"
    result.pack(out, check=False)
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["reproduced"] is True
    # Replayed alone on what the Residual received, the sublayer shows nothing.
    inner = pz.select(model).at_instances_of(pz.nn.Identity)
    with pytest.raises(UsageError, match="shows none"):
        reprokit.pack(
            inner, jnp.full((2, 4), 3e38), out=tmp_path / "inner.repro.zip", signature="nonfinite"
        )


def test_a_layer_that_raises_for_one_sequence_length_is_found(tmp_path):
    model = models.llamalike(blocks=3)
    feed_forward = pz.select(model).at_instances_of(model_parts.TransformerFeedForward)
    raiser = find_layers.RaisesAtLength(length=7)
    model = feed_forward.pick_nth_selected(1).apply(
        lambda ffn: dataclasses.replace(ffn, sublayers=[raiser, *ffn.sublayers])
    )

    with pytest.raises(CaptureError, match="ran without raising"):
        reprokit.find(model, models.tokens(5), side_inputs=_side(5), check="exception")
    result = reprokit.search(model, models.tokens(7), side_inputs=_side(7), check="exception")
    assert result.selection.get() is raiser
    assert result.found_by["exception"] == {
        "type": "builtins.ValueError",
        "message": "no kernel for sequence length 7",
    }
    # Under penzai's Jitted the error is raised while jit traces: still attributed.
    jitted = reprokit.search(
        Jitted(model), models.tokens(7), side_inputs=_side(7), check="exception"
    )
    assert jitted.keypath == "Jitted.body/" + result.keypath
    assert jitted.found_by["while_tracing"] is True

    out = tmp_path / "raises.repro.zip"
    packed = result.pack(out, allow_modules=["find_layers"], check=False)
    assert packed.signature["type"] == "builtins.ValueError"
    code, verdict = run_json("run", out, "--allow-module", "find_layers")
    assert code == 0 and verdict["reproduced"] is True


def _with_low_precision_linear(model):
    """Block 1's feed-forward output projection, computing in bf16 with the same weights."""
    ffn = pz.select(model).at_instances_of(model_parts.TransformerFeedForward).pick_nth_selected(1)
    projection = ffn.at(lambda f: f.sublayers[1])
    linear = projection.get()
    low = find_layers.LowPrecisionLinear(weights=linear.weights, in_axis_names=linear.in_axis_names)
    return projection.set(low), low


def test_a_bf16_layer_is_found_by_mismatch_not_the_layers_downstream(three_blocks):
    model, low = _with_low_precision_linear(three_blocks)
    result = reprokit.search(model, models.tokens(), side_inputs=_side(), check="mismatch")
    assert result.selection.get() is low
    assert result.layer_type == "find_layers.LowPrecisionLinear"
    assert result.found_by["received"]["error"] < 1e-5
    assert result.found_by["returned"]["error"] > result.found_by["tolerance"]
    assert "float64" in result.found_by["reference"]
    # The same model without the bf16 layer: every layer agrees with float64.
    with pytest.raises(CaptureError, match="no layer's output differs") as raised:
        reprokit.find(three_blocks, models.tokens(), side_inputs=_side(), check="mismatch")
    assert "err" in raised.value.report


def test_find_works_inside_a_layer_stack_and_packs_the_block(tmp_path):
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1,
        query_head_multiplier=2,
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=16,
        num_decoder_blocks=3,
        vocab_size=11,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
        use_layer_stack=True,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    attention = pz.select(model).at_instances_of(pz.nn.Attention).get()  # the stacked prototype
    faulty = _plant_inf(attention, stacked_block=2)

    result = reprokit.search(model, models.tokens(), side_inputs=_side())

    assert result.selection.get() is faulty
    assert "LayerStack.stacked_sublayers" in result.keypath
    assert (result.call_index, result.call_count, result.found_by["block"]) == (2, 3, 2)
    out = tmp_path / "stack.repro.zip"
    packed = result.pack(out, check=False)
    assert packed.mode == "jit" and packed.call_index == 2
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["reproduced"] is True


def test_find_works_on_a_jitted_model():
    model = models.llamalike(blocks=3)
    attention = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(1).get()
    faulty = _plant_inf(attention)
    selection = reprokit.find(Jitted(model), models.tokens(), side_inputs=_side())
    assert selection.get() is faulty
    keystr = pz.pretty_keystr(next(iter(selection.selected_by_path)), selection.deselect())
    assert keystr.startswith("Jitted.body/TransformerLM.body/Sequential.sublayers[2]/")
    # mode="eager" removes the Jitted wrapper; the answer is the same layer.
    assert (
        reprokit.find(Jitted(model), models.tokens(), side_inputs=_side(), mode="eager").get()
        is faulty
    )


def test_find_leaves_state_alone_and_packs_the_state_it_saw(tmp_path):
    step = pz.StateVariable(jnp.asarray(3), label="fault/step")
    fault = find_layers.FailsAtStep(step=step, fail_at=3)
    model = pz.nn.Sequential([models.mlp(), fault, pz.nn.Elementwise(jax.nn.relu)])
    result = reprokit.search(model, models.mlp_input())
    assert result.selection.get() is fault
    assert int(step.value) == 3
    out = tmp_path / "state.repro.zip"
    result.pack(out, allow_modules=["find_layers"], check=False)
    assert int(step.value) == 3
    loaded = reprokit.load(out, allow_modules=["find_layers"])
    assert int(loaded.record["initial_var_values"][0].value) == 3
    assert reprokit.replay(out, allow_modules=["find_layers"]).reproduced


def test_documented_limits_give_one_line_errors(tmp_path):
    healthy = models.mlp()
    with pytest.raises(CaptureError, match="no layer returned NaN/Inf") as raised:
        reprokit.find(healthy, models.mlp_input())
    assert "<== CULPRIT" not in raised.value.report and "Linear" in raised.value.report
    nan_input = models.mlp_input() * jnp.nan
    with pytest.raises(CaptureError, match="own inputs .* already hold NaN"):
        reprokit.find(healthy, nan_input)
    with pytest.raises(UsageError, match="check must be one of"):
        reprokit.find(healthy, models.mlp_input(), check="nan")
    with pytest.raises(UsageError, match="only apply to check='mismatch'"):
        reprokit.find(healthy, models.mlp_input(), tolerance=1e-3)
    with pytest.raises(UsageError, match="pz.nn.Layer"):
        reprokit.find(pz.select(healthy).at_instances_of(pz.nn.Linear), models.mlp_input())

    @jax.jit
    def inside(x):
        reprokit.find(healthy, pz.nx.wrap(x, "batch", "features"))
        return x

    with pytest.raises(UsageError, match="outside jax.jit"):
        inside(jnp.ones((3, 4)))


def test_an_exception_inside_a_layer_stack_is_found_but_not_packed(tmp_path):
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1,
        query_head_multiplier=2,
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=16,
        num_decoder_blocks=2,
        vocab_size=11,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
        use_layer_stack=True,
    )
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    raiser = find_layers.RaisesAtLength(length=5)
    model = (
        pz.select(model)
        .at_instances_of(model_parts.TransformerFeedForward)
        .apply(lambda ffn: dataclasses.replace(ffn, sublayers=[raiser, *ffn.sublayers]))
    )
    result = reprokit.search(model, models.tokens(), side_inputs=_side(), check="exception")
    assert result.selection.get() is raiser and result.found_by["while_tracing"]
    with pytest.raises(CaptureError, match="LayerStack.*use_layer_stack=False"):
        result.pack(tmp_path / "x.repro.zip", allow_modules=["find_layers"], check=False)
    assert not list(tmp_path.iterdir())


TARGET = """
import jax.numpy as jnp
from penzai import pz
import models

def make_call():
    model = models.llamalike(blocks=3)
    attention = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(2).get()
    weights = attention.input_to_query.sublayers[0].weights
    names = tuple(weights.value.named_shape)
    data = weights.value.unwrap(*names).at[(0,) * len(names)].set(jnp.inf)
    weights.value = pz.nx.wrap(data, *names)
    return model, models.tokens(), {"token_positions": models.token_positions()}
"""


def test_cli_pack_find_explain(tmp_path):
    script = tmp_path / "target.py"
    script.write_text(textwrap.dedent(TARGET))
    out = tmp_path / "found.repro.zip"
    result = run_reprokit(
        "pack", f"{script}:make_call", "--find", "nonfinite", "--explain", "-o", out, "--no-check"
    )
    assert result.returncode == 0, result.stderr
    assert "<== CULPRIT" in result.stdout
    assert "found by --find nonfinite: TransformerLM.body/Sequential.sublayers[3]/" in result.stdout
    manifest = reprokit.load(out).manifest
    assert manifest["found_by"]["check"] == "nonfinite"
    assert manifest["found_by"]["nonfinite_parameters"][0]["label"].startswith(
        "transformer/block_2/"
    )
    both = run_reprokit("pack", f"{script}:make_call", "--find", "nonfinite", "--select", "x")
    assert both.returncode == 2 and "not both" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1
