"""replay.py uses `reprokit run`'s exit table: 0, 1, 3 invalid, 5 cannot replay here.

Without the reporter's module on the path, replay.py used to die with a
ModuleNotFoundError traceback and exit 1, which its own header defines as
"not reproduced". Now it prints one line naming what is missing and exits 5.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import subprocess_env
from user_module import pack_user_layer


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay_exits")
    out = folder / "blowup.repro.zip"
    source = pack_user_layer(folder, "replay_exits_mod", "Blowup", 500.0, out)
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
