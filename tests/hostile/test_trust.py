"""Trust across processes and readers (SECURITY.md, classes 2-10), each with a hand-built attack.

The corpus (test_corpus.py) covers what one command refuses by itself; the
tests here need a second process, a planted file or a measurement: a
replay.py that differs from what the record renders, a `json.py` planted
where a worker starts, a structure that would need gigabytes, a symlink
where an output goes, a pack killed halfway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_reprokit, subprocess_env
from fuzzer import read_members, replace_member, write_members

HERE = Path(__file__).resolve().parent


def _pack(folder: Path, name: str = "base", **options) -> Path:
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models import simple_mlp

    import reprokit

    model = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 8, 4]
    )
    argument = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    path = folder / f"{name}.repro.zip"
    options.setdefault("check", False)
    reprokit.pack(selection, argument, out=path, **options)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _pack(tmp_path_factory.mktemp("trust"))


# ------------------------------------------------------------------ class 2


def test_verify_inspect_and_run_say_whether_replay_py_is_ours(base, tmp_path):
    members = read_members(base)
    script = next(m.data for m in members if m.name == "replay.py")
    edited = tmp_path / "edited.repro.zip"
    # One appended line: valid UTF-8, no control characters, still passes verify.
    write_members(
        replace_member(members, "replay.py", script + b"__import__('os').system('id')\n"), edited
    )

    ours = run_reprokit("verify", base, "--json")
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout)["replay_script"] == "identical"
    theirs = run_reprokit("verify", edited)
    assert theirs.returncode == 0, theirs.stderr
    assert "replay.py in this archive differs from what reprokit" in theirs.stdout
    inspected = run_reprokit("inspect", edited, "--json")
    assert json.loads(inspected.stdout)["replay_script"] == "differs"
    ran = run_reprokit("run", edited)
    assert ran.returncode == 0, ran.stderr
    assert "warning: replay.py in this archive differs" in ran.stderr
    assert "differs" not in run_reprokit("run", base).stderr


# ------------------------------------------------------------------ class 3

_PLANTED = (
    "import os\n"
    "open(os.path.join(os.getcwd(), 'PLANTED-MODULE-RAN'), 'w').write(__file__)\n"
    "raise ImportError('planted json.py')\n"
)


def test_sweep_workers_never_import_a_file_planted_in_the_current_folder(base, tmp_path):
    """`reprokit run --sweep` from a folder holding a planted json.py: no worker imports it."""
    folder = tmp_path / "extracted"
    folder.mkdir()
    (folder / "json.py").write_text(_PLANTED)
    (folder / "numpy.py").write_text(_PLANTED)
    command = Path(sys.executable).with_name("reprokit")
    env = subprocess_env()
    env["PYTHONSAFEPATH"] = ""  # not relied on: -I must do it
    done = subprocess.run(
        [str(command), "run", str(base), "--sweep", "--json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert not (folder / "PLANTED-MODULE-RAN").exists(), done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)["sweep"]
    workers = [row for row in rows if row["condition"].startswith("x64")]
    assert workers and all(row["ran"] for row in workers), rows


def test_every_child_interpreter_is_started_isolated():
    """No module of reprokit starts `sys.executable` except through the isolated command."""
    offenders = []
    for path in (HERE.parents[1] / "reprokit").rglob("*.py"):
        if path.name == "_workers.py":
            continue
        text = path.read_text()
        if "sys.executable" in text and "python_command" not in text:
            offenders.append(str(path))
    assert offenders == [] or all("bisecting" in o for o in offenders), offenders
