"""Fresh-interpreter workers that answer with one line of JSON.

Some checks must run in a new process: the self-check replays an archive as
a maintainer would, and sweep conditions such as x64 or XLA flags only take
effect before jax starts. Each worker is `python -m reprokit.MODULE ARGS`,
prints a JSON object as its last stdout line, and this module runs it with a
timeout and turns every way it can fail into one short message.
"""

from __future__ import annotations

import json
import subprocess
import sys


class WorkerFailed(Exception):
    """The worker timed out, crashed, or printed no JSON; the message says which."""


def run_worker(module: str, args: list[str], *, env: dict | None, timeout: float) -> dict:
    """Runs `python -m MODULE ARGS` and returns the JSON object it printed last."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"took longer than {timeout:.0f} s") from None
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        if done.returncode < 0:
            raise WorkerFailed(f"the worker process crashed (signal {-done.returncode})") from None
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise WorkerFailed(" ".join(last.split())[:300]) from None
    if not isinstance(result, dict):
        raise WorkerFailed("printed JSON that is not an object")
    return result
