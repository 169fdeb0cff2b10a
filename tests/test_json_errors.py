"""`--json` always prints one JSON object on stdout, on every verb and every exit code.

Scripts and CI jobs triaging archives parse stdout; a refused archive, a usage
error or a machine that cannot replay must still give them
`{"error": ..., "exit_code": ...}` (the one-line message stays on stderr).
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import TESTS, run_reprokit, subprocess_env
from test_cli import SCRIPT_WITH_LOCAL_CLASS
from user_module import pack_user_layer


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("json")
    out = folder / "mod.repro.zip"
    pack_user_layer(folder, "json_errors_mod", "Exploding", 300.0, out)
    script = folder / "local.py"
    script.write_text(SCRIPT_WITH_LOCAL_CLASS.format(tests=str(TESTS)))
    garbage = folder / "garbage.repro.zip"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    return {
        "mod": out,
        "garbage": garbage,
        "missing": folder / "missing.repro.zip",
        "dir": folder,
        "script": script,
    }


CASES = [
    (["run", "{missing}"], 3),
    (["run", "{garbage}"], 3),
    (["run", "{mod}"], 3),  # refused: the module is not allowed
    (["run", "{mod}", "--allow-module", "json_errors_mod"], 5),  # allowed, not installed here
    (["run", "{mod}", "--quiet"], 2),  # --json and --quiet contradict
    (["run", "{mod}", "--no-such-option"], 2),  # click's own usage error
    (["inspect", "{garbage}"], 3),
    (["verify", "{garbage}"], 3),
    (["issue", "{garbage}"], 3),
    (["env", "--diff", "{garbage}"], 3),
    (["pack", "nowhere.py:make_call", "--select", "x"], 2),
    # A class defined in the script cannot be packed (exit 4).
    (["pack", "{script}:make_call", "--select", "Sequential.sublayers[1]", "-o", "x.repro.zip"], 4),
]


@pytest.mark.parametrize("args, code", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_json_on_every_error_path(archives, args, code):
    args = [a.format(**archives) for a in args]
    result = run_reprokit(*args, "--json", cwd=archives["dir"], env=subprocess_env())
    assert result.returncode == code, (result.stdout, result.stderr)
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict), result.stdout
    assert payload["exit_code"] == code
    assert isinstance(payload["error"], str) and payload["error"]
    assert os.path.expanduser("~") not in result.stdout or os.path.expanduser("~") == "/"


def test_json_on_success_is_one_object_too(archives):
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(archives["dir"] / "src"), env["PYTHONPATH"]])
    result = run_reprokit(
        "run", archives["mod"], "--allow-module", "json_errors_mod", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reproduced"] is True
