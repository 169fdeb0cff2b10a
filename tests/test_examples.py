"""The scripts in examples/ really pack their failing layer, both ways, and replay elsewhere.

Each example is run as a script (Python API) and through `reprokit pack
SCRIPT:make_call --select KEYPATH` (CLI), with the keypath taken from the
script's own docstring so the documented command is the one tested. Every
archive is replayed in a fresh interpreter from a scratch directory.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_json, run_reprokit, subprocess_env

EXAMPLES = REPO / "examples"

# script -> (default archive, recorded signature kind, layer type, phrase in the verdict)
CASES = {
    "nan_attention.py": ("attn-nan.repro.zip", "nonfinite", "Attention", "non-finite values"),
    "shape_error.py": ("shape-error.repro.zip", "exception", "Linear", "StructureMismatchError"),
}


def _documented_keypath(script: Path) -> str:
    """The KEYPATH in the docstring's `reprokit pack ... --select '...'` command."""
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree)
    found = re.findall(r"--select '([^']+)'", doc)
    assert len(found) == 1, f"{script.name}: expected one --select in the docstring"
    assigned = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["KEYPATH"]
    ]
    assert assigned == [found[0]], f"{script.name}: KEYPATH differs from the docstring's --select"
    return found[0]


@pytest.fixture(scope="module", params=sorted(CASES))
def packed(request, tmp_path_factory):
    """Packs one example both ways in a scratch directory; returns what the tests need."""
    name = request.param
    script = EXAMPLES / name
    default_out, kind, layer_type, phrase = CASES[name]
    workdir = tmp_path_factory.mktemp(name.removesuffix(".py"))
    env = subprocess_env()
    as_script = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    keypath = _documented_keypath(script)
    via_cli = run_reprokit(
        "pack", f"{script}:make_call", "--select", keypath, "-o", "cli.repro.zip", cwd=workdir
    )
    return {
        "name": name,
        "workdir": workdir,
        "keypath": keypath,
        "script_archive": workdir / default_out,
        "cli_archive": workdir / "cli.repro.zip",
        "as_script": as_script,
        "via_cli": via_cli,
        "kind": kind,
        "layer_type": layer_type,
        "phrase": phrase,
    }


def test_script_writes_its_default_archive_and_prints_the_replay_command(packed):
    result = packed["as_script"]
    assert result.returncode == 0, result.stderr[-3000:]
    archive = packed["script_archive"]
    assert archive.is_file()
    assert f"reprokit run {archive.name}" in result.stdout
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["signature"]["kind"] == packed["kind"]
    assert manifest["layer"]["keypath"] == packed["keypath"]
    assert manifest["layer"]["type"].endswith("." + packed["layer_type"])


def test_script_archive_reproduces_in_a_fresh_process(packed):
    assert packed["script_archive"].is_file(), packed["as_script"].stderr[-3000:]
    result = run_reprokit("run", packed["script_archive"].name, cwd=packed["workdir"])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith("REPRODUCED"), result.stdout
    assert packed["phrase"] in result.stdout


def test_cli_form_packs_and_reproduces(packed):
    result = packed["via_cli"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reprokit run cli.repro.zip" in result.stdout
    code, verdict = run_json("run", "cli.repro.zip", cwd=packed["workdir"])
    assert code == 0, verdict
    assert verdict["reproduced"] is True
    assert verdict["signature"]["kind"] == packed["kind"]
    assert verdict["layer"]["keypath"] == packed["keypath"]


def test_inspect_names_the_layer_type(packed):
    assert packed["script_archive"].is_file(), packed["as_script"].stderr[-3000:]
    result = run_reprokit("inspect", packed["script_archive"].name, cwd=packed["workdir"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f".{packed['layer_type']} at {packed['keypath']}" in result.stdout
    assert f"submodel: {packed['layer_type']}" in result.stdout


def test_unzipped_replay_script_reproduces(packed, tmp_path):
    """The maintainer's other route: unzip the archive and run its replay.py."""
    assert packed["script_archive"].is_file(), packed["as_script"].stderr[-3000:]
    with zipfile.ZipFile(packed["script_archive"]) as zf:
        zf.extractall(tmp_path / "repro")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "repro" / "replay.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith("REPRODUCED"), result.stdout


def test_the_planted_fault_is_where_the_example_says(packed):
    """NaN: finite input and weights in, NaN out. Shape error: 6 input rows against 8 features."""
    import reprokit

    record = reprokit.load(packed["script_archive"]).record
    argument = np.asarray(record["argument"].data_array)
    assert np.isfinite(argument).all()
    if packed["kind"] == "nonfinite":
        output = np.asarray(record["output"].data_array)
        assert np.isnan(output).any()
        for projection in (record["submodel"].input_to_query, record["submodel"].input_to_key):
            weights = projection.sublayers[0].weights.value.data_array
            assert np.isfinite(np.asarray(weights)).all()
    else:
        assert "output" not in record
        weights = record["submodel"].weights.value
        assert weights.named_shape["features"] == 6
        assert record["argument"].named_shape["features"] == 8
