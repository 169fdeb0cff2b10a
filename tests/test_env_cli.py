"""`reprokit env` and `env --diff`, and --json/--quiet across the commands."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner
from conftest import TESTS, run_python, run_reprokit

from reprokit._cli import main

# Packs in a fresh interpreter whose numerics differ from jax's defaults only
# through jax.config (not environment variables), as a reporter's script might.
_PACK_WITH_X64_AND_PRECISION = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    import models
    from penzai import pz
    import reprokit
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    reprokit.pack(selection, models.mlp_input(), out={out!r})
    """
)


@pytest.fixture(scope="module")
def x64_archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("x64") / "x64.repro.zip"
    result = run_python(_PACK_WITH_X64_AND_PRECISION.format(tests=str(TESTS), out=str(out)))
    assert result.returncode == 0, result.stderr
    return out


def test_env_prints_what_an_archive_would_record():
    text = run_reprokit("env")
    assert text.returncode == 0, text.stderr
    as_json = run_reprokit("env", "--json")
    env = json.loads(as_json.stdout)
    assert set(env) >= {"python", "packages", "backend", "jax_config", "env_vars", "xla_flags"}
    jax_version = env["packages"]["jax"]
    assert f"jax {jax_version}" in text.stdout
    assert f"backend {env['backend']['platform']}" in text.stdout
    assert "packages:" in text.stdout and "penzai" in text.stdout


def test_env_diff_shows_exactly_the_changed_numerics(x64_archive):
    result = run_reprokit("env", "--diff", x64_archive, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = {row["field"]: row for row in payload["differences"]}
    assert set(rows) == {"jax_config.jax_enable_x64", "jax_config.jax_default_matmul_precision"}
    assert rows["jax_config.jax_enable_x64"]["recorded"] is True
    assert rows["jax_config.jax_enable_x64"]["current"] is False
    assert all(row["version_sensitive"] for row in rows.values())
    text = run_reprokit("env", "--diff", x64_archive)
    lines = text.stdout.splitlines()
    assert lines[0] == f"environment recorded in {x64_archive} vs here:"
    assert lines[1].split() == ["field", "|", "recorded", "|", "here"]
    body = [line for line in lines[3:] if "|" in line]
    assert [line.split()[0] for line in body] == [
        "jax_config.jax_default_matmul_precision",
        "jax_config.jax_enable_x64",
    ]
    assert lines[-1] == "* may change numerical results"


def test_env_diff_of_a_non_archive_is_exit_3(tmp_path):
    bogus = tmp_path / "x.repro.zip"
    bogus.write_text("nope")
    result = CliRunner().invoke(main, ["env", "--diff", str(bogus)])
    assert result.exit_code == 3
    assert result.output.startswith("reprokit: error:") and len(result.output.splitlines()) == 1


@pytest.mark.parametrize("verb", ["pack", "run", "inspect", "env", "issue"])
def test_every_verb_has_json_and_quiet(verb):
    help_text = CliRunner().invoke(main, [verb, "--help"]).output
    assert "--json" in help_text and "--quiet" in help_text


@pytest.mark.parametrize(
    "args",
    [
        ["pack", "x.py:make_call", "--select", "x"],
        ["run", "x.repro.zip"],
        ["inspect", "x.repro.zip"],
        ["env"],
        ["issue", "x.repro.zip"],
    ],
)
def test_json_and_quiet_together_are_a_usage_error(args):
    result = CliRunner().invoke(main, [*args, "--json", "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "reprokit: error: choose one of --json and --quiet"
    # With --json, stdout holds one JSON object on every exit code (issue 13).
    assert json.loads(result.stdout) == {
        "error": "choose one of --json and --quiet",
        "exit_code": 2,
    }


def test_quiet_prints_nothing(x64_archive):
    for args in (["inspect", str(x64_archive)], ["env", "--diff", str(x64_archive)]):
        result = CliRunner().invoke(main, [*args, "--quiet"])
        assert result.exit_code == 0 and result.output == "", (args, result.output)
