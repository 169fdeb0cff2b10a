"""Capture semantics: raising layers, several calls, modes, and what pack refuses."""

from __future__ import annotations

import functools

import custom_layers
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from conftest import run_json, run_reprokit, subprocess_env
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

import reprokit
from reprokit import CaptureError, UsageError


def _raising_model(limit=3):
    return pz.nn.Sequential([models.mlp(), custom_layers.RaisesOnLongSequences(limit=limit)])


def _seq_input(length):
    return pz.nx.wrap(jnp.ones((length, 4)), "seq", "features")


def test_a_layer_that_raises_is_packed_and_reproduces(tmp_path):
    model = _raising_model()
    selection = pz.select(model).at_instances_of(custom_layers.RaisesOnLongSequences)
    out = tmp_path / "raise.repro.zip"
    result = reprokit.pack(selection, _seq_input(5), out=out, allow_modules=["custom_layers"])
    assert result.signature == {
        "kind": "exception",
        "type": "builtins.ValueError",
        "message": "sequence length 5 exceeds limit 3",
    }
    code, verdict = run_json("run", out, "--allow-module", "custom_layers")
    assert code == 0
    assert verdict["reproduced"] is True
    assert verdict["replayed_exception"]["type"] == "builtins.ValueError"
    assert verdict["replayed_exception"]["message"] == "sequence length 5 exceeds limit 3"
    text = run_reprokit("run", out, "--allow-module", "custom_layers")
    assert text.returncode == 0 and text.stdout.startswith("REPRODUCED")


FIXED_CUSTOM_LAYERS = """
import dataclasses
from penzai import pz

@pz.pytree_dataclass
class RaisesOnLongSequences(pz.nn.Layer):
    limit: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        return x  # the maintainer's fix
"""


def test_a_fixed_layer_does_not_reproduce(tmp_path):
    model = _raising_model()
    selection = pz.select(model).at_instances_of(custom_layers.RaisesOnLongSequences)
    out = tmp_path / "raise.repro.zip"
    reprokit.pack(selection, _seq_input(5), out=out, allow_modules=["custom_layers"])
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    (fixed / "custom_layers.py").write_text(FIXED_CUSTOM_LAYERS)
    env = subprocess_env(PYTHONPATH=str(fixed))
    result = run_reprokit("run", out, "--allow-module", "custom_layers", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("NOT REPRODUCED: the layer returned normally")


def test_every_call_is_recorded_and_the_first_misbehaving_one_is_packed(tmp_path):
    # log applied four times to 10: 2.30, 0.83, -0.18, then NaN on the fourth call.
    model = custom_layers.Repeat(body=pz.nn.Elementwise(jnp.log), times=5)
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    out = tmp_path / "log.repro.zip"
    result = reprokit.pack(selection, jnp.full((2,), 10.0), out=out)
    assert result.call_count == 5
    assert result.call_index == 3
    assert result.signature["kind"] == "nonfinite"
    loaded = reprokit.load(out)
    assert float(loaded.record["argument"][0]) == pytest.approx(
        np.log(np.log(np.log(10.0))), rel=1e-6
    )
    assert reprokit.replay(out).reproduced


def test_call_index_chooses_among_repeated_calls(tmp_path):
    model = custom_layers.Repeat(body=pz.nn.Elementwise(jnp.log), times=5)
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    result = reprokit.pack(selection, jnp.full((2,), 10.0), out=tmp_path / "c0.repro.zip", call=0)
    assert result.call_index == 0 and result.signature == {"kind": "output"}
    last = reprokit.pack(selection, jnp.full((2,), 10.0), out=tmp_path / "c-1.repro.zip", call=-1)
    assert last.call_index == 4
    with pytest.raises(UsageError, match="called 5 times"):
        reprokit.pack(selection, jnp.full((2,), 10.0), out=tmp_path / "c9.repro.zip", call=9)


def test_layer_inside_jitted_is_captured_and_replayed_under_jit(tmp_path):
    model = Jitted(models.llamalike())
    selection = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(0)
    out = tmp_path / "jit.repro.zip"
    result = reprokit.pack(
        selection,
        models.tokens(),
        side_inputs={"token_positions": models.token_positions()},
        out=out,
    )
    assert result.mode == "jit"
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["output_bitwise_equal"] and verdict["recorded_mode"] == "jit"


def test_mode_jit_can_be_asked_for(tmp_path):
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    result = reprokit.pack(selection, models.mlp_input(), out=tmp_path / "j.repro.zip", mode="jit")
    assert result.mode == "jit"
    verdict = reprokit.replay(tmp_path / "j.repro.zip")
    assert verdict.details["output_bitwise_equal"]


def test_pack_inside_jit_is_refused_with_a_clear_error(tmp_path):
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)

    @jax.jit
    def step(x):
        reprokit.pack(selection, pz.nx.wrap(x, "batch", "features"), out=tmp_path / "t.repro.zip")
        return x

    with pytest.raises(CaptureError, match="traced values"):
        step(jnp.ones((2, 4)))
    assert not (tmp_path / "t.repro.zip").exists()


def _local_fn():
    return lambda x: x * 2


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda x: x + 1, "lambda"),
        (_local_fn(), "lambda"),
        (functools.partial(lambda x, y: x * y, y=2), "lambda"),
    ],
)
def test_lambdas_and_closures_are_refused_at_pack_time(tmp_path, fn, message):
    model = pz.nn.Sequential([pz.nn.Elementwise(fn)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    with pytest.raises(CaptureError, match=message):
        reprokit.pack(selection, jnp.ones(3), out=tmp_path / "l.repro.zip")
    assert not list(tmp_path.iterdir())


def test_known_callables_round_trip(tmp_path):
    fns = [jax.nn.relu, jax.nn.silu, functools.partial(jax.nn.gelu, approximate=True), jnp.tanh]
    model = pz.nn.Sequential([pz.nn.Elementwise(fn) for fn in fns])
    selection = pz.select(model).at_keypaths([()])
    out = tmp_path / "fns.repro.zip"
    reprokit.pack(selection, jnp.linspace(-2, 2, 7), out=out)
    loaded = reprokit.load(out)
    rebuilt = [layer.fn for layer in loaded.submodel.sublayers]
    assert rebuilt[0] is jax.nn.relu and rebuilt[1] is jax.nn.silu and rebuilt[3] is jnp.tanh
    assert rebuilt[2].func is jax.nn.gelu and rebuilt[2].keywords == {"approximate": True}
    assert reprokit.replay(out).details["output_bitwise_equal"]


def test_selection_must_pick_exactly_one_layer(tmp_path):
    model = models.mlp()
    with pytest.raises(UsageError, match="matches 0 layers"):
        reprokit.pack(
            pz.select(model).at_instances_of(pz.nn.Attention),
            models.mlp_input(),
            out=tmp_path / "a.repro.zip",
        )
    with pytest.raises(UsageError, match="matches 3 layers"):
        reprokit.pack(
            pz.select(model).at_instances_of(pz.nn.Linear),
            models.mlp_input(),
            out=tmp_path / "a.repro.zip",
        )
    with pytest.raises(UsageError, match="pz.Selection"):
        reprokit.pack(model, models.mlp_input(), out=tmp_path / "a.repro.zip")


def test_model_that_fails_before_the_layer_is_reported(tmp_path):
    model = pz.nn.Sequential([custom_layers.RaisesOnLongSequences(limit=1), models.mlp()])
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    with pytest.raises(CaptureError, match="before the selected layer"):
        reprokit.pack(selection, _seq_input(4), out=tmp_path / "b.repro.zip")


def test_recorded_environment_and_mode_are_in_the_manifest(tmp_path):
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    out = tmp_path / "m.repro.zip"
    reprokit.pack(selection, models.mlp_input(), out=out, note="seen at step 1200")
    manifest = reprokit.load(out).manifest
    assert manifest["mode"] == "eager"
    assert manifest["note"] == "seen at step 1200"
    assert manifest["environment"]["jax_config"]["jax_enable_x64"] is False
    assert manifest["environment"]["packages"]["jax"] == jax.__version__


def test_a_dict_argument_keeps_the_callers_order_and_leaves_it_untouched(tmp_path):
    """An input without variables is recorded as the layer got it, not rebuilt by penzai."""
    argument = {"zeta": jnp.ones(3), "alpha": jnp.full(3, 2.0), "mid": jnp.zeros(3)}
    before = list(argument)
    model = pz.nn.Sequential([pz.nn.Identity()])
    selection = pz.select(model).at_instances_of(pz.nn.Identity).pick_nth_selected(0)
    out = tmp_path / "order.repro.zip"
    reprokit.pack(selection, argument, out=out, quiet=True)
    assert list(argument) == before
    loaded = reprokit.load(out)
    assert list(loaded.record["argument"]) == before
    code, report = run_json("run", str(out))
    assert code == 0 and report["reproduced"]
    assert all(leaf["bitwise_equal"] for leaf in report["output"])
