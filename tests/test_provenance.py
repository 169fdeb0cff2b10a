"""How the archive was made travels with it: run, inspect and the issue text say it.

How the layer was found (find's check and rule, the error against the
tolerance) and what the self-check measured, the other mode included, used to
live only in manifest.json and selfcheck.json.
"""

from __future__ import annotations

import importlib
import sys

import custom_layers
import jax.numpy as jnp
import pytest
from conftest import run_json, run_reprokit, subprocess_env
from penzai import pz
from test_find_nan_rule import _left_padded, _minus_inf_mask_model

import reprokit
from reprokit.archive._provenance import found_by_lines

LOGEXP = """
import jax.numpy as jnp


def log_exp(x):
    # XLA simplifies log(exp(x)) to x under jit; eagerly exp(100) overflows first.
    return jnp.log(jnp.exp(x))
"""


@pytest.fixture(scope="module")
def jit_differs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("provenance")
    (folder / "logexp_mod.py").write_text(LOGEXP)
    sys.path.insert(0, str(folder))
    try:
        mod = importlib.import_module("logexp_mod")
        model = pz.nn.Sequential([pz.nn.Elementwise(mod.log_exp)])
        argument = pz.nx.wrap(jnp.array([1.0, 100.0, 2.0]), "features")
        out = folder / "logexp.repro.zip"
        result = reprokit.pack(
            pz.select(model).at_instances_of(pz.nn.Elementwise),
            argument,
            out=out,
            mode="eager",
            quiet=True,
        )
    finally:
        sys.path.remove(str(folder))
    return out, result, folder


def test_the_other_mode_finding_appears_in_run_inspect_and_issue(jit_differs):
    out, result, folder = jit_differs
    other = result.self_check["other_mode"]
    assert other["mode"] == "jit" and other["reproduced"] is False
    expected = "captured eager; jit replay differs, max abs error inf, does not reproduce"
    env = subprocess_env()
    env["PYTHONPATH"] = str(folder) + ":" + env["PYTHONPATH"]
    ran = run_reprokit("run", out, "--allow-module", "logexp_mod", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "reproduced on the reporter's machine after packing: yes" in ran.stdout
    assert expected in ran.stdout
    assert "found by: the reporter's own selection (reprokit pack)" in ran.stdout
    shown = run_reprokit("inspect", out)
    assert expected in shown.stdout, shown.stdout
    issue = run_reprokit("issue", out)
    assert expected in issue.stdout and "how it was made" in issue.stdout
    assert expected in (folder / "logexp.issue.md").read_text()  # written at pack time


def test_found_by_nan_rule_travels_to_run(tmp_path):
    model = _minus_inf_mask_model()
    tokens, sides = _left_padded()
    found = reprokit.search(model, tokens, side_inputs=sides)
    out = tmp_path / "softmax.repro.zip"
    found.pack(out, quiet=True)
    ran = run_reprokit("run", out)
    assert ran.returncode == 0, ran.stderr
    assert "found by: reprokit find, check=nonfinite (followed the NaN" in ran.stdout
    assert "before it: ApplyCausalAttentionMask produced" in ran.stdout
    code, verdict = run_json("run", out)
    assert verdict["found_by"]["rule"] == "nan"


def test_an_exception_archive_self_check_says_nothing_about_output(tmp_path):
    model = pz.nn.Sequential([custom_layers.RaisesOnLongSequences(limit=3)])
    out = tmp_path / "raises.repro.zip"
    result = reprokit.pack(
        pz.select(model).at_instances_of(custom_layers.RaisesOnLongSequences),
        pz.nx.wrap(jnp.ones((5, 4)), "seq", "features"),
        out=out,
        quiet=True,
    )
    assert "(the same exception)" in result.summary()
    assert "output" not in [x for x in result.summary().splitlines() if "self-check" in x][0]
    ran = run_reprokit("run", out, "--allow-module", "custom_layers")
    line = [x for x in ran.stdout.splitlines() if "reporter's machine" in x][0]
    assert line.strip().endswith("yes, the same exception") and "output" not in line


def test_mismatch_found_by_shows_error_vs_tolerance():
    manifest = {
        "found_by": {
            "check": "mismatch",
            "reference": "float64 (jax_enable_x64)",
            "error": {"abs": 0.5, "rel": 0.0144},
            "tolerance": 0.125,
            "tolerance_dtype": "bfloat16",
        }
    }
    lines = found_by_lines(manifest)
    assert lines[0] == "found by: reprokit find, check=mismatch"
    assert "error: rel 1.44e-02, abs 5.00e-01 vs tolerance rel 1.25e-01 (bfloat16)" in lines[2]
    # Hostile values are not printed as given.
    hostile = {"found_by": {"check": "\x1b[2J", "tolerance_dtype": "$(rm -rf)", "error": "x"}}
    assert "\x1b" not in "".join(found_by_lines(hostile))
