"""Verdicts with infinite errors: measured without warnings, printed as strict JSON.

An output that is +Inf on one side and finite on the other is infinitely far
off. `json.dumps` would print that as `Infinity`, which is not JSON: jq,
JavaScript and reprokit's own manifest reader all refuse it.
"""

from __future__ import annotations

import json
import warnings
import zipfile

import jax.numpy as jnp
import msgpack
import numpy as np
from conftest import run_python, run_reprokit
from fuzzer import read_members, replace_member, write_members
from penzai import pz

import reprokit
from reprokit.portable._verdict import compare_leaves, json_ready


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_differences_are_infinite_and_silent():
    recorded = np.array([np.inf, np.nan, 1.0, -np.inf, np.inf], np.float32)
    replayed = np.array([np.inf, 1.0, 1.0, -np.inf, 2.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inf - inf must not warn
        (row,) = compare_leaves([("x", recorded)], [("x", replayed)])
    assert row["status"] == "differs"
    assert row["max_abs_error"] == np.inf and row["max_rel_error"] == np.inf


def test_json_ready_spells_non_finite_floats():
    value = {"a": [float("inf"), float("-inf"), float("nan"), 1.5], "b": (2, "x", None)}
    assert json_ready(value) == {"a": ["inf", "-inf", "nan", 1.5], "b": [2, "x", None]}
    json.dumps(json_ready(value), allow_nan=False)


def test_run_json_and_replay_py_print_strict_json_for_infinite_errors(tmp_path):
    # A recorded reference output doctored to +Inf: the replay's finite output
    # then differs from it by an infinite amount, and does not reproduce.
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.tanh)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    path = tmp_path / "out.repro.zip"
    argument = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 8), "features")
    reprokit.pack(selection, argument, out=path, signature="output", check=False)
    members = read_members(path)
    structure = msgpack.unpackb(
        next(m.data for m in members if m.name == "structure.msgpack"), raw=False
    )
    output_index = len(structure["arrays"]) - 1  # the output is encoded last
    doctored = np.full(8, np.inf, np.float32).tobytes()
    write_members(replace_member(members, f"arrays/{output_index}.bin", doctored), path)

    result = run_reprokit("run", path, "--json")
    assert result.returncode == 1, result.stderr
    verdict = _strict(result.stdout)
    assert verdict["reproduced"] is False
    (row,) = verdict["output"]
    assert row["max_abs_error"] == "inf" and row["max_rel_error"] == "inf"
    assert "RuntimeWarning" not in result.stderr

    zipfile.ZipFile(path).extractall(tmp_path / "r")
    script = tmp_path / "r" / "replay.py"
    standalone = run_python(
        f"import runpy, sys; sys.argv = ['replay.py', '--json']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    assert standalone.returncode == 1, standalone.stderr
    assert _strict(standalone.stdout)["output"] == verdict["output"]
