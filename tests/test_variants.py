"""Maintainer tools on a replay: --repeat, --sweep, --reference, --stablehlo, environment diff."""

from __future__ import annotations

import cases
import custom_layers
import jax
import jax.numpy as jnp
import models
import pytest
from conftest import run_json, run_python, run_reprokit
from penzai import pz

import reprokit

ALLOW = ("--allow-module", "custom_layers")


@pytest.fixture(scope="module")
def gemma_attention(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma") / "gemma-attn.repro.zip"
    selection, argument, side_inputs = cases.gemma_attention_case()
    reprokit.pack(selection, argument, side_inputs=side_inputs, out=path)
    return path


def test_repeat_finds_host_side_nondeterminism(tmp_path):
    model = pz.nn.Sequential([models.mlp(), custom_layers.HostNoise()])
    selection = pz.select(model).at_instances_of(custom_layers.HostNoise)
    out = tmp_path / "noise.repro.zip"
    reprokit.pack(selection, models.mlp_input(), out=out, allow_modules=["custom_layers"])
    code, report = run_json("run", out, *ALLOW, "--repeat", "5")
    assert report["repeat"]["bitwise_identical"] is False
    first = report["repeat"]["first_difference"]
    assert first["path"] == "output.data_array" and first["index"] == [0, 0]
    text = run_reprokit("run", out, *ALLOW, "--repeat", "3")
    assert "NONDETERMINISTIC" in text.stdout


def test_repeat_reports_a_deterministic_layer_as_stable(gemma_attention):
    code, report = run_json("run", gemma_attention, "--repeat", "10")
    assert code == 0
    assert report["repeat"] == {
        "runs": 10,
        "requested": 10,
        "bitwise_identical": True,
        "first_difference": None,
    }


def test_sweep_shows_jit_and_eager_differ_and_uses_both_cores(gemma_attention):
    code, report = run_json("run", gemma_attention, "--sweep")
    assert code == 0
    rows = {row["condition"]: row for row in report["sweep"]}
    assert rows["eager"]["output_bitwise_equal"] is True  # captured eagerly
    assert rows["jit"]["output_bitwise_equal"] is False
    assert rows["jit"]["max_abs_error"] > 0
    assert rows["platform gpu"]["ran"] is False and "no gpu" in rows["platform gpu"]["note"]
    stablehlo = rows["StableHLO artifact (jit, no penzai)"]
    assert stablehlo["ran"] and stablehlo["reproduced"]
    x64 = rows["x64 on (float64 params)"]
    assert x64["ran"], x64["note"]
    # Worker rows run in another process while the in-process rows run here.
    in_process_end = max(
        r["started"] + r["elapsed_s"]
        for r in report["sweep"]
        if r["condition"] == "jit, matmul precision highest"
    )
    worker_start = min(
        r["started"] for r in report["sweep"] if r["condition"].startswith(("x64", "StableHLO"))
    )
    assert worker_start < in_process_end
    text = run_reprokit("run", gemma_attention, "--sweep")
    assert "condition" in text.stdout and "StableHLO" in text.stdout


def test_stablehlo_artifact_matches_the_jit_replay_bitwise(tmp_path):
    model = models.llamalike(jnp.bfloat16, gemma=True)
    selection = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(0)
    out = tmp_path / "jit.repro.zip"
    reprokit.pack(
        selection,
        models.tokens(),
        side_inputs={"token_positions": models.token_positions()},
        out=out,
        mode="jit",
    )
    jit_code, jit_verdict = run_json("run", out)
    hlo_code, hlo_verdict = run_json("run", out, "--stablehlo")
    assert jit_code == hlo_code == 0
    assert jit_verdict["output_bitwise_equal"] and hlo_verdict["output_bitwise_equal"]


def test_reference_float64_reports_errors_of_both_outputs(gemma_attention):
    code, report = run_json("run", gemma_attention, "--reference", "float64")
    assert code == 0
    (leaf,) = report["reference"]["leaves"]
    assert leaf["recorded_max_abs_error"] > 0  # bf16 params against float64 math
    assert leaf["closer"] in ("recorded", "replayed", "same")


def test_env_diff_shows_exactly_the_changed_numerics_config(tmp_path):
    out = tmp_path / "x64.repro.zip"
    code = f"""
import sys; sys.path.insert(0, {str(models.__file__.rsplit("/", 1)[0])!r})
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
from penzai import pz
import models, reprokit
m = models.mlp()
reprokit.pack(pz.select(m).at_instances_of(pz.nn.Linear).pick_nth_selected(0), models.mlp_input(), out={str(out)!r})
"""
    packed = run_python(code)
    assert packed.returncode == 0, packed.stderr[-2000:]
    check = f"""
import json, reprokit
from reprokit.environment._diff import diff_environments
from reprokit.environment._snapshot import capture_environment
recorded = reprokit.replaying._replay.open_archive({str(out)!r}).manifest["environment"]
print(json.dumps([d.field for d in diff_environments(recorded, capture_environment())]))
"""
    result = run_python("import reprokit.replaying._replay\n" + check)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    fields = json.loads(result.stdout)
    assert fields == [
        "jax_config.jax_default_matmul_precision",
        "jax_config.jax_enable_x64",
    ] or sorted(fields) == sorted(
        ["jax_config.jax_enable_x64", "jax_config.jax_default_matmul_precision"]
    )
    # Replay restores the recorded config, so the layer runs in float64 again.
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["output_bitwise_equal"]
    assert jax.config.jax_enable_x64 is False  # this process is untouched


def test_a_stablehlo_module_that_crashes_the_parser_is_refused_not_fatal():
    # Found by fuzzing: a mutated module (CRC fixed up) that segfaults MLIR's bytecode reader.
    from conftest import TESTS

    archive = TESTS / "data" / "stablehlo-parser-crash.repro.zip"
    result = run_reprokit("run", archive, "--stablehlo")
    assert result.returncode == 3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("reprokit: error: the archive's StableHLO module failed to parse safely")
