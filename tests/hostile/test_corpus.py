"""Every hostile archive ends in exit code 3 and one line, from run, inspect and verify.

The base is a real archive packed here with `reprokit.pack`; every hostile
archive is a doctored copy of it (corpus.py). All of them go through `reprokit
run`, `inspect` and `verify` in ONE fresh interpreter (driver.py, so jax
starts once), from an empty folder, with $HOME and $TMPDIR in a sandbox.
Each must also finish within a time bound, write nothing (the working folder
stays empty, no file is opened for writing outside $TMPDIR), start no
process, unpickle and compile nothing (an audit hook in the driver watches),
and never leave the marker file its payload would create. A handful also go
through real `python -m reprokit` processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import corpus
import pytest
from fuzzer import read_members

from reprokit.replaying._replay import available_memory

HERE = Path(__file__).resolve().parent

COMMANDS = ("run", "inspect", "verify")
# Seconds one command may take on one hostile archive (they fail in
# milliseconds; the bound catches a hang or a bomb being inflated).
TIME_BOUND = 10.0
# Extra jobs: (id, args relative to the corpus folder, expected exit code).
EXTRA_JOBS = (
    ("bomb-ratio-raised", ["verify", "--max-compression-ratio", "1e9", "zip-bomb-ratio"], 0),
    ("limit-members", ["verify", "--max-members", "3", "BASE"], 3),
    ("limit-member-size", ["inspect", "--max-member-size", "1K", "BASE"], 3),
    ("limit-total-size", ["run", "--max-total-size", "1K", "BASE"], 3),
    ("limits-raised", ["verify", "--max-members", "1000", "--max-total-size", "1G", "BASE"], 0),
    ("allow-module-os-refused", ["run", "--allow-module", "os", "fn-os-system"], 3),
    ("allow-module-pip-refused", ["verify", "--allow-module", "pip", "BASE"], 3),
    ("elementwise-relu-control", ["verify", "elementwise-relu"], 0),
    ("elementwise-relu-control-run", ["run", "elementwise-relu"], 1),
)


def _pack_base(folder: Path) -> Path:
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
    path = folder / "base.repro.zip"
    reprokit.pack(selection, argument, out=path)
    return path


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> dict[str, Path]:
    """Folders for the driver: an empty working folder, a $HOME and a $TMPDIR."""
    root = tmp_path_factory.mktemp("sandbox")
    folders = {name: root / name for name in ("cwd", "home", "tmp", "corpus")}
    for folder in folders.values():
        folder.mkdir()
    return folders


@pytest.fixture(scope="session")
def base(sandbox) -> Path:
    """A real archive of a tiny penzai Linear, packed by reprokit.pack."""
    return _pack_base(sandbox["corpus"])


@pytest.fixture(scope="session")
def hostile_archives(base, sandbox) -> dict[str, Path | None]:
    """case name -> path of its archive (None when the base lacks the member it needs)."""
    data = base.read_bytes()
    members = read_members(base)
    paths: dict[str, Path | None] = {}
    for name, (build, _) in corpus.CASES.items():
        if name == "array-fill-beyond-memory" and _fill_would_fit():
            paths[name] = None  # never run: this machine would really allocate it
            continue
        try:
            payload = build(data, list(members))
        except corpus.Absent:
            paths[name] = None
            continue
        path = sandbox["corpus"] / f"{len(paths):03d}.repro.zip"
        path.write_bytes(payload)
        paths[name] = path
    control = corpus.CASES_CONTROL["elementwise-relu"](data, list(members))
    (sandbox["corpus"] / "elementwise-relu.repro.zip").write_bytes(control)
    return paths


def _fill_would_fit() -> bool:
    return (available_memory() or 0) >= corpus.BEYOND_MEMORY


@pytest.fixture(scope="session")
def driver_results(base, hostile_archives, sandbox) -> dict[tuple[str, str], dict]:
    """(case, command) -> what the command did; also ("control", command) for the base."""
    jobs = [
        {"id": f"control {command}", "args": [command, str(base)], "warm": True}
        for command in COMMANDS
    ]
    for name, path in hostile_archives.items():
        if path is not None:
            jobs += [
                {"id": f"{name} {command}", "args": [command, str(path)]} for command in COMMANDS
            ]
    for job_id, args, _ in EXTRA_JOBS:
        resolved = []
        for arg in args:
            if arg == "BASE":
                arg = str(base)
            elif arg in hostile_archives:
                arg = str(hostile_archives[arg])
            elif arg == "elementwise-relu":
                arg = str(sandbox["corpus"] / "elementwise-relu.repro.zip")
            resolved.append(arg)
        jobs.append({"id": job_id, "args": resolved})
    jobs_path = sandbox["tmp"].parent / "jobs.json"
    results_path = sandbox["tmp"].parent / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ)
    env.update(HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, str(HERE / "driver.py"), str(jobs_path), str(results_path)],
        cwd=sandbox["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {}
    for result in json.loads(results_path.read_text()):
        key = tuple(result["id"].rsplit(" ", 1)) if " " in result["id"] else (result["id"], "")
        results[key] = result
    return results


def _assert_refused(result: dict, expect: str) -> None:
    where = f"{result['id']}: stderr={result['stderr']!r} stdout={result['stdout'][-300:]!r}"
    assert result["unexpected"] is None, where + "\n" + result["unexpected"]
    assert result["exit_code"] == 3, where
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, where
    assert lines[0].startswith("reprokit: error: "), where
    # A crash reported by the catch-all names an exception type, not the problem.
    assert "rerun with --debug" not in lines[0], where
    assert "Traceback" not in result["stderr"] + result["stdout"], where
    assert expect in lines[0], where
    assert result["escapes"] == [], where
    assert result["new_files"] == [], where
    assert result["seconds"] < TIME_BOUND, where


@pytest.mark.parametrize("name", sorted(corpus.CASES))
def test_hostile_archive_is_refused(name, hostile_archives, driver_results, sandbox):
    if name == "array-fill-beyond-memory" and _fill_would_fit():
        pytest.skip(f"this machine has {available_memory()} bytes available: the fill would fit")
    if hostile_archives[name] is None:
        pytest.skip("the base archive has no such member")
    expect = corpus.CASES[name][1]
    refusers = corpus.REFUSED_BY.get(name, COMMANDS)
    for command in COMMANDS:
        result = driver_results[(name, command)]
        if command in refusers:
            _assert_refused(result, expect)
        else:  # judged by name alone: may pass, but must not crash or do anything
            assert result["unexpected"] is None and result["exit_code"] in (0, 3), result
            assert result["escapes"] == [] and result["new_files"] == []
    assert not (sandbox["cwd"] / corpus.MARKER).exists()
    if os.environ.get("REPROKIT_SHOW_REFUSALS"):
        print(f"\n{name}: {driver_results[(name, 'verify')]['stderr'].strip()}")


def test_the_valid_base_archive_passes_in_the_same_driver(driver_results):
    """The control: the harness itself works, so refusals above are real."""
    for command in COMMANDS:
        result = driver_results[("control", command)]
        assert result["unexpected"] is None, result["unexpected"]
        assert result["exit_code"] == 0, result["stderr"]
        assert result["stderr"] == ""
    assert "sha256: " in driver_results[("control", "verify")]["stdout"]


@pytest.mark.parametrize("job_id, args, code", EXTRA_JOBS, ids=[job[0] for job in EXTRA_JOBS])
def test_limits_and_controls(job_id, args, code, driver_results):
    result = driver_results[(job_id, "")]
    assert result["unexpected"] is None, result["unexpected"]
    assert result["exit_code"] == code, result["stderr"] + result["stdout"][-500:]
    assert result["escapes"] == [] and result["new_files"] == []
    if code == 3:
        assert len(result["stderr"].splitlines()) == 1, result["stderr"]
        assert "limit" in result["stderr"] or "never allows" in result["stderr"]


def test_whole_corpus_runs_fast(driver_results):
    total = sum(result["seconds"] for key, result in driver_results.items() if key[0] != "control")
    assert total < 60, total


# (case, command) pairs run in real `python -m reprokit` processes.
REAL_PROCESSES = (
    ("pickle-as-structure.msgpack", "run"),
    ("fn-os-system", "run"),
    ("elementwise-partial-of-partial-system", "run"),
    ("manifest-xla-dump-to", "run"),
    ("zip-slip-dotdot", "inspect"),
    ("zip-bomb-ratio", "verify"),
    ("manifest-newer-format", "run"),
)


def test_real_processes_refuse_with_one_line(hostile_archives, sandbox):
    xla_dump = "/tmp/reprokit-pwned"
    assert not os.path.exists(xla_dump), f"remove {xla_dump} left by something else"
    env = dict(os.environ)
    env.update(HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "reprokit", command, str(hostile_archives[name])],
            cwd=sandbox["cwd"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in REAL_PROCESSES
    ]
    for (name, command), process in zip(REAL_PROCESSES, processes, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        where = f"{command} {name}: {stderr!r}"
        assert process.returncode == 3, where
        assert stdout == "", where
        assert len(stderr.splitlines()) == 1 and stderr.startswith("reprokit: error: "), where
        assert corpus.CASES[name][1] in stderr, where
    assert time.monotonic() - started < 120
    assert not os.path.exists(xla_dump)
    assert list(sandbox["cwd"].iterdir()) == []
    assert not (sandbox["cwd"] / corpus.MARKER).exists()
