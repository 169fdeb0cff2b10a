"""Shared fixtures: fresh interpreters and the reprokit command, for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# Test tools (the fuzzer, model factories) are imported by name from tests/ and tests/hostile/.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    return env


def run_reprokit(
    *args: str, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 300
):
    """Runs `python -m reprokit ARGS` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "reprokit", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or subprocess_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_python(code: str, *, cwd=None, env: dict | None = None, timeout: float = 300):
    """Runs `code` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or subprocess_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_json(*args: str, **kwargs) -> tuple[int, dict]:
    result = run_reprokit(*args, "--json", **kwargs)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def cli():
    return run_reprokit
