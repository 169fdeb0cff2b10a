"""The command line: pack from a script, run, inspect, help texts and exit codes."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner
from conftest import TESTS, run_reprokit

from reprokit._cli import main

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax.numpy as jnp
    from penzai import pz
    import models

    def make_call():
        model = models.mlp()
        poisoned = pz.select(model).at_instances_of(pz.Parameter).pick_nth_selected(1).apply(
            lambda p: pz.Parameter(value=p.value * jnp.nan, label=p.label))
        return poisoned, models.mlp_input()

    def make_call_with_side_inputs():
        return models.llamalike(), models.tokens(), {{"token_positions": models.token_positions()}}

    def not_a_tuple():
        return 3
    """
)

SCRIPT_WITH_LOCAL_CLASS = textwrap.dedent(
    """
    import dataclasses, sys
    sys.path.insert(0, {tests!r})
    from penzai import pz
    import models

    @pz.pytree_dataclass
    class MyLayer(pz.nn.Layer):
        def __call__(self, x, /, **side_inputs):
            return x

    def make_call():
        return pz.nn.Sequential([models.mlp(), MyLayer()]), models.mlp_input()
    """
)

LINEAR_KEYPATH = "MLP.sublayers[2]/Affine.sublayers[0]"


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "failing.py"
    path.write_text(SCRIPT.format(tests=str(TESTS)))
    return path


def invoke(*args, cwd=None):
    runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_pack_lists_layers_with_keypaths(script):
    result = invoke("pack", f"{script}:make_call", "--list")
    assert result.exit_code == 0
    assert LINEAR_KEYPATH in result.output
    assert "Linear" in result.output


def test_pack_then_run_in_a_fresh_process(script, tmp_path):
    out = tmp_path / "nan.repro.zip"
    packed = invoke(
        "pack",
        f"{script}:make_call",
        "--select",
        LINEAR_KEYPATH,
        "-o",
        out,
        "--note",
        "NaN at step 3",
    )
    assert packed.exit_code == 0, packed.output
    assert "non-finite output" in packed.output and "reprokit run nan.repro.zip" in packed.output
    ran = run_reprokit("run", out)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("REPRODUCED: non-finite values in output")
    shown = run_reprokit("inspect", out)
    assert shown.returncode == 0
    assert (
        "NaN at step 3" in shown.stdout and "Linear" in shown.stdout and "sha256:" in shown.stdout
    )


def test_pack_with_side_inputs(script, tmp_path):
    out = tmp_path / "attn.repro.zip"
    listed = invoke("pack", f"{script}:make_call_with_side_inputs", "--list")
    keypath = next(
        line.split()[-1] for line in listed.output.splitlines() if line.startswith("Attention")
    )
    packed = invoke("pack", f"{script}:make_call_with_side_inputs", "--select", keypath, "-o", out)
    assert packed.exit_code == 0, packed.output
    assert run_reprokit("run", out).returncode == 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["pack", "nowhere.py:make_call", "--select", "x"], 2, "no such script"),
        (["pack", "{script}", "--select", "x"], 2, "must look like"),
        (["pack", "{script}:missing", "--select", "x"], 2, "has no function 'missing'"),
        (["pack", "{script}:not_a_tuple", "--select", "x"], 2, "must return (model, argument)"),
        (["pack", "{script}:make_call"], 2, "--select KEYPATH"),
        (["pack", "{script}:make_call", "--select", ".nope"], 2, "no subtree at keypath"),
        (["run", "{tmp}/missing.repro.zip"], 3, "is not a file"),
        (["inspect", "{script}"], 3, ""),
    ],
)
def test_errors_are_one_line_with_documented_exit_codes(script, tmp_path, args, code, message):
    args = [a.format(script=script, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reprokit: error:")
    assert message in lines[0]


def test_a_class_defined_in_the_script_is_refused_with_advice(tmp_path):
    path = tmp_path / "local.py"
    path.write_text(SCRIPT_WITH_LOCAL_CLASS.format(tests=str(TESTS)))
    result = run_reprokit(
        "pack",
        f"{path}:make_call",
        "--select",
        "Sequential.sublayers[1]",
        "-o",
        tmp_path / "x.repro.zip",
    )
    assert result.returncode == 4
    assert "move it into an importable module" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.repro.zip").exists()


def test_help_teaches_usage_and_exit_codes():
    top = invoke("--help")
    assert "Exit codes" in top.output and "reprokit pack" in top.output
    for verb in ("pack", "run", "inspect"):
        result = invoke(verb, "--help")
        assert result.exit_code == 0
        assert "Exit codes" in result.output
    assert "--select" in invoke("pack", "--help").output
    assert "--allow-module" in invoke("run", "--help").output


def test_debug_shows_the_traceback(tmp_path):
    result = run_reprokit("run", tmp_path / "missing.repro.zip", "--debug")
    assert result.returncode == 3
    assert "Traceback" in result.stderr
