"""The GitHub issue snippet: written by pack, printed by `reprokit issue`, warned when too large."""

from __future__ import annotations

import json
import textwrap

import custom_layers
import jax.numpy as jnp
import models
import pytest
from click.testing import CliRunner
from conftest import TESTS, run_reprokit
from penzai import pz

import reprokit
from reprokit._cli import main
from reprokit.views._issue import GITHUB_ATTACHMENT_LIMIT, issue_path_for, issue_text


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    model = models.llamalike()
    selection = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(1)
    out = tmp_path_factory.mktemp("attn") / "attn-nan.repro.zip"
    side = {"token_positions": models.token_positions()}
    result = reprokit.pack(
        selection, models.tokens(), side_inputs=side, out=out, note="seen after step 1200"
    )
    return result


def test_pack_writes_the_snippet_next_to_the_archive(attention):
    path = attention.path
    assert attention.issue_path == path.removesuffix(".repro.zip") + ".issue.md"
    assert f"issue text: {attention.issue_path}" in attention.summary()
    text = open(attention.issue_path).read()
    assert text == issue_text(path)["markdown"]
    first = text.splitlines()[0]
    assert first.startswith("**`Attention` returns output values")
    assert f"`{attention.layer_type}` at `{attention.keypath}`" in text
    # Input shapes, as penzai prints named arrays (pipes escaped for the table).
    assert "`argument: NamedArray float32(\\| batch:1, seq:5, embedding:8)`" in text
    assert "`side_inputs['token_positions']: NamedArray int32(\\| batch:1, seq:5)`" in text
    # The two replay commands, and the environment table.
    assert "reprokit run attn-nan.repro.zip\n" in text
    assert "unzip attn-nan.repro.zip -d repro" in text and "python repro/replay.py" in text
    import jax

    assert f"| jax | `{jax.__version__}` |" in text
    assert "| numerics config | `jax defaults` |" in text
    assert "seen after step 1200" in text
    assert "WARNING" not in text


def test_reprokit_issue_prints_the_same_text(attention):
    printed = CliRunner().invoke(main, ["issue", attention.path])
    assert printed.exit_code == 0, printed.output
    assert printed.output == open(attention.issue_path).read()
    as_json = CliRunner().invoke(main, ["issue", attention.path, "--json"])
    payload = json.loads(as_json.output)
    assert payload["markdown"] == printed.output and payload["too_large"] is False
    assert payload["size"] == attention.size and len(payload["sha256"]) == 64
    assert payload["sha256"] in printed.output
    quiet = CliRunner().invoke(main, ["issue", attention.path, "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_an_exception_names_the_error_and_the_modules_to_allow(tmp_path):
    model = pz.nn.Sequential([models.mlp(), custom_layers.RaisesOnLongSequences(limit=3)])
    selection = pz.select(model).at_instances_of(custom_layers.RaisesOnLongSequences)
    out = tmp_path / "raise.repro.zip"
    reprokit.pack(
        selection,
        pz.nx.wrap(jnp.ones((5, 4)), "seq", "features"),
        out=out,
        allow_modules=["custom_layers"],
    )
    text = (tmp_path / "raise.issue.md").read_text()
    assert text.startswith(
        "**`RaisesOnLongSequences` raises `ValueError: sequence length 5 exceeds limit 3`**"
    )
    assert "reprokit run raise.repro.zip --allow-module custom_layers" in text
    assert "<details><summary>Traceback at capture</summary>" in text
    assert "`argument: NamedArray float32(\\| seq:5, features:4)`" in text


def test_an_archive_over_githubs_limit_gets_a_warning_with_advice(tmp_path):
    # 3.2M float32 in and out: about 25.6 MB, just over the limit. Not constant:
    # an array that repeats one element would be stored as a payload-free fill.
    selection = pz.select(pz.nn.Sequential([pz.nn.Elementwise(jnp.tanh)])).at_keypaths([()])
    out = tmp_path / "big.repro.zip"
    result = reprokit.pack(selection, jnp.linspace(-2.0, 2.0, 3_200_000), out=out)
    assert result.size > GITHUB_ATTACHMENT_LIMIT
    assert "over GitHub's 25 MB attachment limit" in result.summary()
    text = (tmp_path / "big.issue.md").read_text()
    assert "> [!WARNING]" in text and "over GitHub's 25 MB limit" in text
    assert "--select" in text and "sha256" in text and "upload it somewhere" in text
    printed = run_reprokit("issue", out)
    assert printed.returncode == 0
    assert printed.stdout == text
    assert "reprokit: warning:" in printed.stderr


def test_pack_cli_json_reports_the_issue_path(tmp_path):
    script = tmp_path / "make.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TESTS)!r})
            import models

            def make_call():
                return models.mlp(), models.mlp_input()
            """
        )
    )
    out = tmp_path / "lin.repro.zip"
    keypath = "MLP.sublayers[0]/Affine.sublayers[0]"
    packed = CliRunner().invoke(
        main, ["pack", f"{script}:make_call", "--select", keypath, "-o", str(out), "--json"]
    )
    assert packed.exit_code == 0, packed.output
    payload = json.loads(packed.output)
    assert payload["path"] == str(out) and payload["keypath"] == keypath
    assert payload["issue_path"] == str(tmp_path / "lin.issue.md")
    assert (tmp_path / "lin.issue.md").is_file()
    quiet = CliRunner().invoke(
        main, ["pack", f"{script}:make_call", "--select", keypath, "-o", str(out), "-q"]
    )
    assert quiet.exit_code == 0 and quiet.output == ""


@pytest.mark.parametrize(
    "archive, expected",
    [
        ("bug.repro.zip", "bug.issue.md"),
        ("dir/x.zip", "dir/x.issue.md"),
        ("odd", "odd.issue.md"),
    ],
)
def test_issue_path_naming(archive, expected):
    assert issue_path_for(archive) == expected


def test_issue_on_a_non_archive_is_one_line_exit_3(tmp_path):
    bogus = tmp_path / "x.repro.zip"
    bogus.write_bytes(b"not a zip")
    result = CliRunner().invoke(main, ["issue", str(bogus)])
    assert result.exit_code == 3
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reprokit: error:")


def test_inputs_past_twelve_lines_are_counted_not_described():
    """The snippet lists twelve inputs and counts the rest, NamedArrays and arrays alike."""
    from reprokit.portable._arrays import describe
    from reprokit.record._encoding import encode_tree
    from reprokit.views._issue import input_descriptions

    argument = {f"n{i:02d}": pz.nx.wrap(jnp.ones((2, 3)), "a", "b") for i in range(15)}
    argument["plain"] = [jnp.zeros(4), jnp.zeros(5)]
    arrays: list[dict] = []

    def on_array(value):
        arrays.append(describe(value)[0])
        return len(arrays) - 1

    structure = {
        "record": {"argument": encode_tree(argument, on_array, where="argument")},
        "arrays": arrays,
    }
    lines = input_descriptions(structure)
    assert lines[0] == "argument['n00']: NamedArray float32(| a:2, b:3)"
    assert len(lines) == 13 and lines[-1] == "... 5 more arrays"
