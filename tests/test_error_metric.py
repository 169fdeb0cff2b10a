"""One error metric everywhere: abs = max|x - ref|, rel = abs / max|ref|, per leaf.

find, `run`, `run --reference`, `--sweep` and the verdict JSON name the same
metric, and each layer's tolerance is printed as it is applied, dtype included
(find's default is max(1e-3, 16 eps) of the call's narrowest float dtype).
"""

from __future__ import annotations

import jax.numpy as jnp
import models
from conftest import run_json, run_reprokit
from penzai import pz
from test_find import _side, _with_low_precision_linear

import reprokit
from reprokit.portable._verdict import ERROR_METRIC
from reprokit.replaying._variants import VariantRow, format_sweep


def test_find_run_reference_and_json_share_the_metric_and_print_the_tolerance(tmp_path):
    model, low = _with_low_precision_linear(models.llamalike(blocks=3))
    found = reprokit.search(model, models.tokens(), side_inputs=_side(), check="mismatch")
    assert found.selection.get() is low
    by = found.found_by
    assert by["error_metric"] == ERROR_METRIC
    assert by["tolerance_dtype"] == "float32" and by["tolerance"] == 1e-3
    assert by["tolerance_rule"] == "float32: max(1e-3, 16 eps)"
    assert by["error"]["rel"] == by["returned"]["error"] > by["tolerance"]
    assert 0 < by["error"]["abs"] < float("inf")
    assert f"error: abs {by['error']['abs']:.2e}, rel {by['error']['rel']:.2e}" in found.report
    assert "tolerance: rel 1.00e-03, applied to this layer (float32: max(1e-3, 16 eps))" in (
        found.report
    )
    assert "(tol 1.0e-03 float32)" in found.report  # each layer's own limit in the table

    out = tmp_path / "drift.repro.zip"
    found.pack(out, quiet=True, check=False)  # find_layers: the reporter's module, no flag
    code, verdict = run_json("run", out, "--allow-module", "find_layers", "--reference", "float64")
    assert code == 0, verdict
    assert verdict["error_metric"] == ERROR_METRIC
    reference = verdict["reference"]
    assert reference["error_metric"] == ERROR_METRIC
    leaf = reference["leaves"][0]
    # Both parts of the metric, for the recorded and the replayed output. (This
    # layer's compute_dtype field stays bf16 under run's float64 reference, so
    # the errors here are 0: find's reference promotes dtype fields, run's does not.)
    for side in ("recorded", "replayed"):
        assert leaf[f"{side}_rel_error"] >= 0 and leaf[f"{side}_max_abs_error"] >= 0
    text = run_reprokit("run", out, "--allow-module", "find_layers", "--reference", "float64")
    assert f"error: {ERROR_METRIC}" in text.stdout
    assert "recorded error (abs/rel)" in text.stdout


def test_an_output_verdict_prints_the_tolerance_applied_with_its_dtype(tmp_path):
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.tanh)])
    argument = models.mlp_input().astype(jnp.bfloat16)
    out = tmp_path / "bf16.repro.zip"
    reprokit.pack(
        pz.select(model).at_instances_of(pz.nn.Elementwise),
        argument,
        out=out,
        signature="output",
        check=False,
        quiet=True,
    )
    code, verdict = run_json("run", out)
    assert code == 0
    (row,) = verdict["output"]
    assert row["tolerance"] == {"rel": 4 * 2.0**-7, "dtype": "bfloat16", "source": "4 eps"}


def test_sweep_rows_use_the_metric():
    row = VariantRow(
        condition="eager",
        ran=True,
        reproduced=True,
        output_bitwise_equal=False,
        max_abs_error=0.5,
        max_rel_error=9.0,
        rel_error=0.25,
    )
    assert "error abs 0.5, rel 0.25" in format_sweep([row])
