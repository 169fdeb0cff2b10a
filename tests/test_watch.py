"""`reprokit.watch`: a misbehaving call inside the user's own loop is packed from its exact step.

The planted fault is `FailsAtStep`: its state counts steps and it divides
by zero at step 13, so only that step's state reproduces it. The loops are
the user's: 20 steps, the model under penzai's `Jitted` or the user's own
`jax.jit`, varying inputs.
"""

from __future__ import annotations

import find_layers
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from conftest import run_json
from penzai import pz
from penzai.models.transformer.variants import llamalike_common
from penzai.toolshed.jit_wrapper import Jitted

import reprokit
from reprokit import FaultDetected, UsageError

ALLOW = ["find_layers"]


def _stepping_model(fail_at: int = 13):
    step = pz.StateVariable(jnp.asarray(0), label="fault/step")
    body = pz.nn.Sequential(
        [
            models.mlp(),
            find_layers.FailsAtStep(step=step, fail_at=fail_at),
            pz.nn.Elementwise(jax.nn.relu),
        ]
    )
    return Jitted(body), step


def _input(step: int):
    return models.mlp_input() * (step + 1.0)


def test_watch_packs_step_13_of_a_20_step_loop_and_it_replays(tmp_path):
    model, step = _stepping_model()
    out = tmp_path / "step.repro.zip"
    watched = reprokit.watch(model, out=out, allow_modules=ALLOW, self_check=False)
    outputs = [watched(_input(i)) for i in range(20)]

    assert len(outputs) == 20 and int(step.value) == 20  # the loop ran on, state untouched
    assert [fault["model_call"] for fault in watched.faults] == [13]
    (archive,) = watched.archives
    assert archive.path == str(out) and archive.layer_type == "find_layers.FailsAtStep"
    loaded = reprokit.load(out, allow_modules=ALLOW)
    assert loaded.manifest["found_by"]["watch"]["model_call"] == 13
    assert int(loaded.record["initial_var_values"][0].value) == 13
    # The packed argument is what the layer received at step 13, not at any other step.
    expected = model.body.sublayers[0](_input(13))
    np.testing.assert_array_equal(
        np.asarray(loaded.record["argument"].unwrap("batch", "features")),
        np.asarray(expected.unwrap("batch", "features")),
    )
    code, verdict = run_json("run", out, "--allow-module", "find_layers")
    assert code == 0 and verdict["reproduced"] is True


def test_watching_one_layer_can_raise_after_packing(tmp_path):
    model, step = _stepping_model()
    selection = pz.select(model).at_instances_of(find_layers.FailsAtStep)
    watched = reprokit.watch(
        selection,
        out=tmp_path / "one.repro.zip",
        on_fault="raise",
        allow_modules=ALLOW,
        self_check=False,
    )
    for i in range(13):
        watched(_input(i))
    with pytest.raises(FaultDetected, match="at model call 13; packed into") as raised:
        watched(_input(13))
    assert raised.value.model_call == 13
    assert raised.value.archive.keypath == "Jitted.body/Sequential.sublayers[1]"
    assert reprokit.replay(raised.value.archive.path, allow_modules=ALLOW).reproduced
    assert int(step.value) == 14
    # The watch is spent (max_archives=1): later calls run as usual.
    watched(_input(14))


def test_watch_under_the_users_own_jit(tmp_path):
    model, step = _stepping_model()
    out = tmp_path / "jit.repro.zip"
    watched = reprokit.watch(model.body, out=out, allow_modules=ALLOW, self_check=False)
    slots, state = pz.unbind_state_vars(watched, freeze=True)

    @jax.jit
    def train_step(state, x):
        return slots.stateless_call(state, x)

    for i in range(20):
        _, state = train_step(state, _input(i))
    jax.effects_barrier()
    (archive,) = watched.archives
    loaded = reprokit.load(archive.path, allow_modules=ALLOW)
    assert loaded.manifest["found_by"]["watch"]["model_call"] is None
    assert int(loaded.record["initial_var_values"][0].value) == 13
    assert reprokit.replay(archive.path, allow_modules=ALLOW).reproduced


def test_watch_one_layer_inside_a_layer_stack_after_a_bad_update(tmp_path):
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
    model = Jitted(
        llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    )
    attention = pz.select(model).at_instances_of(pz.nn.Attention).get()
    query = pz.select(model).at_subtrees_where(lambda x: x is attention.input_to_query.sublayers[0])
    watched = reprokit.watch(query, out=tmp_path / "stack.repro.zip", self_check=False)
    weights = attention.input_to_query.sublayers[0].weights
    side = {"token_positions": models.token_positions()}
    for i in range(8):
        if i == 5:  # a bad optimizer update writes an Inf into block 2's slice
            names = tuple(weights.value.named_shape)
            index = [0] * len(names)
            index[names.index("blocks")] = 2
            data = weights.value.unwrap(*names).at[tuple(index)].set(jnp.inf)
            weights.value = pz.nx.wrap(data, *names)
        watched(models.tokens(), **side)
    (fault,) = watched.faults
    assert fault["model_call"] == 5 and fault["call_index"] == 2
    assert reprokit.replay(fault["path"]).reproduced


def test_watch_for_exceptions_packs_and_reraises_with_a_note(tmp_path):
    body = pz.nn.Sequential([models.mlp(), find_layers.RaisesAtLength(length=6)])
    watched = reprokit.watch(
        body,
        out=tmp_path / "raise.repro.zip",
        check="exception",
        allow_modules=ALLOW,
        self_check=False,
    )
    for length in range(2, 6):
        watched(pz.nx.wrap(jnp.ones((length, 4)), "seq", "features"))
    with pytest.raises(ValueError, match="no kernel for sequence length 6") as raised:
        watched(pz.nx.wrap(jnp.ones((6, 4)), "seq", "features"))
    assert any("packed this exception" in note for note in raised.value.__notes__)
    (archive,) = watched.archives
    assert archive.signature["kind"] == "exception"
    assert reprokit.replay(archive.path, allow_modules=ALLOW).reproduced


def test_watch_refuses_what_it_cannot_do(tmp_path):
    model = models.mlp()
    with pytest.raises(UsageError, match="check='mismatch'"):
        reprokit.watch(model, check="mismatch")
    with pytest.raises(UsageError, match=r"\.repro\.zip"):
        reprokit.watch(model, out=tmp_path / "x.tar")
    with pytest.raises(UsageError, match="max_archives"):
        reprokit.watch(model, max_archives=0)
    with pytest.raises(UsageError, match="on_fault"):
        reprokit.watch(model, on_fault="stop")
    with pytest.raises(UsageError, match="already watched"):
        reprokit.watch(reprokit.watch(model))
    healthy = reprokit.watch(model)
    for i in range(3):
        healthy(_input(i))
    assert healthy.archives == [] and healthy.faults == []
    assert healthy.unwatched() is not None
