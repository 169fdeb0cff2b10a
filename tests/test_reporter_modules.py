"""The reporter's own importable modules need no flag at pack time; maintainers stay strict.

Packing runs the reporter's code on the reporter's machine: the modules the
record needs beyond penzai/jax/numpy are trusted for the pack-time round trip
and the self-check, recorded in the manifest, and the summary says what a
maintainer must install and allow.
"""

from __future__ import annotations

import importlib
import json
import os
import zipfile

import jax.numpy as jnp
import models
from conftest import run_json, run_reprokit, subprocess_env
from penzai import pz

import reprokit

MYMOD = '''
import dataclasses
import jax.numpy as jnp
from penzai import pz


def overflowing(x):
    return jnp.exp(x * 200.0)


@pz.pytree_dataclass
class MyLayer(pz.nn.Layer):
    """A reporter's layer: exp that overflows for large inputs."""

    axis: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        return pz.nx.nmap(overflowing)(x)
'''


def _mymod(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "mymod_reporter.py").write_text(MYMOD)
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module("mymod_reporter"), folder


def test_a_user_module_layer_packs_with_no_allow_modules(tmp_path, monkeypatch):
    mymod, folder = _mymod(tmp_path, monkeypatch)
    model = pz.nn.Sequential([models.mlp(), mymod.MyLayer(axis="features")])
    selection = pz.select(model).at_instances_of(mymod.MyLayer)
    out = tmp_path / "mine.repro.zip"
    result = reprokit.pack(selection, models.mlp_input() * 3.0, out=out, quiet=True)
    assert result.signature["kind"] == "nonfinite"
    assert result.self_check["ran"] and result.self_check["reproduced"] is True
    assert result.user_modules == ("mymod_reporter",)
    summary = result.summary()
    assert (
        "maintainers: install `mymod_reporter` and pass `--allow-module mymod_reporter`" in summary
    )
    assert "--bundle-code" in summary
    with zipfile.ZipFile(out) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["modules"] == ["mymod_reporter"]
    # The maintainer side is exactly as strict: refused without the flag...
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(folder), subprocess_env()["PYTHONPATH"]]))
    refused = run_reprokit("run", out, env=env)
    assert refused.returncode == 3 and "--allow-module mymod_reporter" in refused.stderr
    # ...and reproduces with it.
    code, verdict = run_json("run", out, "--allow-module", "mymod_reporter", env=env)
    assert code == 0 and verdict["reproduced"] is True


def test_a_stdlib_callable_is_still_refused_at_pack_time(tmp_path):
    # Trusting the reporter's modules never extends to what no --allow-module admits.
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.tanh), pz.nn.Elementwise(os.getpid)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise).pick_nth_selected(1)
    try:
        reprokit.pack(selection, models.mlp_input(), out=tmp_path / "x.repro.zip", quiet=True)
    except (reprokit.CaptureError, reprokit.UsageError, TypeError) as error:
        assert "allow-module os" not in str(error)
    else:
        raise AssertionError("an os function was packed")
