"""replay.py uses `reprokit run`'s exit table: 0, 1, 3 invalid, 5 cannot replay here.

Without the reporter's module on the path, replay.py used to die with a
ModuleNotFoundError traceback and exit 1, which its own header defines as
"not reproduced". Now it prints one line naming what is missing and exits 5.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile

import models
import pytest
from conftest import subprocess_env
from penzai import pz

import reprokit

MYMOD = """
import dataclasses
import jax.numpy as jnp
from penzai import pz


@pz.pytree_dataclass
class Blowup(pz.nn.Layer):
    axis: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **side_inputs):
        return pz.nx.nmap(jnp.exp)(x * 500.0)
"""


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay_exits")
    source = folder / "src"
    source.mkdir()
    (source / "replay_exits_mod.py").write_text(MYMOD)
    sys.path.insert(0, str(source))
    try:
        mod = importlib.import_module("replay_exits_mod")
        model = pz.nn.Sequential([models.mlp(), mod.Blowup(axis="features")])
        out = folder / "blowup.repro.zip"
        reprokit.pack(
            pz.select(model).at_instances_of(mod.Blowup),
            models.mlp_input(),
            out=out,
            check=False,
            quiet=True,
        )
    finally:
        sys.path.remove(str(source))
    repro = folder / "repro"
    zipfile.ZipFile(out).extractall(repro)
    return repro, source


def _replay(repro, *, path_to_module=None):
    env = subprocess_env()
    env["PYTHONPATH"] = str(path_to_module) if path_to_module else ""
    return subprocess.run(
        [sys.executable, str(repro / "replay.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=repro.parent,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_replay_py_reproduces_with_the_module(unpacked):
    repro, source = unpacked
    result = _replay(repro, path_to_module=source)
    assert result.returncode == 0, result.stderr
    assert (
        "Exit status, as `reprokit run`: 0 reproduced, 1 not reproduced, 3 invalid"
        in (repro / "replay.py").read_text()
    )


def test_a_missing_module_is_one_line_and_exit_5(unpacked):
    repro, _ = unpacked
    result = _replay(repro)
    assert result.returncode == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot replay here: module 'replay_exits_mod' is not installed" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_missing_array_file_is_exit_3(unpacked, tmp_path):
    repro, source = unpacked
    copy = tmp_path / "repro"
    copy.mkdir()
    for member in repro.rglob("*"):
        target = copy / member.relative_to(repro)
        if member.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(member.read_bytes())
    arrays = sorted((copy / "arrays").glob("*.bin"))
    assert arrays
    os.remove(arrays[0])
    result = _replay(copy, path_to_module=source)
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"'{arrays[0].name}' is missing" in result.stderr
