"""Regression tests from archives: reprokit.testing, the pytest plugin, and `run --expect`."""

from __future__ import annotations

import shutil
import sys

import custom_layers
import jax
import jax.numpy as jnp
import models
import pytest
from click.testing import CliRunner
from conftest import TESTS, run_reprokit, subprocess_env
from penzai import pz
from test_capture import FIXED_CUSTOM_LAYERS

import reprokit
from reprokit._cli import main
from reprokit.testing import assert_fixed, assert_reproduces

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def raising_archive(tmp_path_factory):
    """A custom layer that raises on long sequences, packed with its module allowed."""
    model = pz.nn.Sequential([models.mlp(), custom_layers.RaisesOnLongSequences(limit=3)])
    selection = pz.select(model).at_instances_of(custom_layers.RaisesOnLongSequences)
    out = tmp_path_factory.mktemp("raise") / "raise.repro.zip"
    argument = pz.nx.wrap(jnp.ones((5, 4)), "seq", "features")
    reprokit.pack(selection, argument, out=out, allow_modules=["custom_layers"])
    return out


@pytest.fixture(scope="module")
def fixed_module_dir(tmp_path_factory):
    """A folder whose custom_layers.py is the maintainer's fix, to put first on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("fixed")
    (folder / "custom_layers.py").write_text(FIXED_CUSTOM_LAYERS)
    return folder


def test_assert_reproduces_and_assert_fixed(raising_archive):
    verdict = assert_reproduces(raising_archive, allow_modules=["custom_layers"])
    assert verdict.reproduced
    with pytest.raises(AssertionError, match="still reproduces") as error:
        assert_fixed(raising_archive, allow_modules=["custom_layers"])
    # The message is the formatted verdict, as `reprokit run` prints it.
    assert "REPRODUCED: " in str(error.value)
    assert "sequence length 5 exceeds limit 3" in str(error.value)


def test_a_fixed_layer_passes_assert_fixed(raising_archive, fixed_module_dir, monkeypatch):
    # The maintainer's fix, imported in this process as the test session would.
    monkeypatch.syspath_prepend(str(fixed_module_dir))
    monkeypatch.delitem(sys.modules, "custom_layers")
    verdict = assert_fixed(raising_archive, allow_modules=["custom_layers"])
    assert not verdict.reproduced
    with pytest.raises(AssertionError, match="expected the recorded issue to reproduce"):
        assert_reproduces(raising_archive, allow_modules=["custom_layers"])


def test_an_unreplayable_archive_never_counts_as_fixed(raising_archive):
    with pytest.raises(reprokit.RefusedTypeError):
        assert_fixed(raising_archive)  # custom_layers not allowed


def test_the_recorded_jax_config_is_put_back(tmp_path):
    selection = pz.select(pz.nn.Sequential([pz.nn.Elementwise(jnp.log)])).at_keypaths([()])
    out = tmp_path / "x64.repro.zip"
    jax.config.update("jax_enable_x64", True)
    try:
        reprokit.pack(selection, jnp.array([-1.0, 2.0], dtype=jnp.float64), out=out)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert reprokit.load(out).manifest["environment"]["jax_config"]["jax_enable_x64"] is True
    jax.config.update("jax_enable_x64", False)  # load applied the recorded x64
    assert_reproduces(out)
    assert jax.config.jax_enable_x64 is False


def test_run_expect_fixed_flips_the_exit_code(raising_archive, fixed_module_dir):
    allow = ["--allow-module", "custom_layers"]
    still = CliRunner().invoke(main, ["run", str(raising_archive), *allow, "--expect", "fixed"])
    assert still.exit_code == 1, still.output
    assert "expect fixed: FAILED" in still.output
    default = CliRunner().invoke(main, ["run", str(raising_archive), *allow, "-q"])
    assert default.exit_code == 0 and default.output == ""
    env = subprocess_env(PYTHONPATH=f"{fixed_module_dir}:{TESTS}")
    fixed = run_reprokit("run", raising_archive, *allow, "--expect", "fixed", "--json", env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert '"as_expected": true' in fixed.stdout and '"reproduced": false' in fixed.stdout


# ------------------------------------------------------------------ pytest plugin

_INI = """
[pytest]
reprokit_regressions = regressions
reprokit_allow_modules = custom_layers
"""


def _regressions(pytester, archive, ini=_INI):
    pytester.makefile(".ini", pytest=ini)
    folder = pytester.mkdir("regressions")
    shutil.copy(archive, folder / "raise.repro.zip")
    return folder


def test_plugin_fails_while_the_bug_reproduces_and_passes_once_fixed(
    pytester, raising_archive, fixed_module_dir, monkeypatch
):
    _regressions(pytester, raising_archive)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # A fresh pytest with the plugin loaded from its entry point, as a maintainer runs it.
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    failing = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    failing.assert_outcomes(failed=1)
    failing.stdout.fnmatch_lines(
        [
            "*raise.repro.zip: the recorded issue still reproduces (not fixed yet)*",
            "*REPRODUCED: *",
            "FAILED regressions/raise.repro.zip::fixed*",
        ]
    )
    monkeypatch.setenv("PYTHONPATH", f"{fixed_module_dir}:{TESTS}")
    passing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    passing.assert_outcomes(passed=1)
    passing.stdout.fnmatch_lines(["*NOT REPRODUCED*", "PASSED regressions/raise.repro.zip::fixed"])


def test_plugin_collects_nothing_unless_configured(pytester, raising_archive):
    _regressions(pytester, raising_archive, ini="[pytest]\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    assert "raise.repro.zip" not in result.stdout.str()


def test_plugin_names_the_ini_option_for_refused_modules(pytester, raising_archive):
    _regressions(pytester, raising_archive, ini="[pytest]\nreprokit_regressions = regressions\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-m", "reprokit")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*reprokit: error: *custom_layers*", "*reprokit_allow_modules*"])
