"""Runs reprokit's command line over many archives in one fresh interpreter; prints JSON.

One interpreter for the whole hostile corpus keeps CI fast (jax starts once)
while each archive still goes through the real `main` of `python -m
reprokit`, via click's CliRunner. Usage::

    python driver.py JOBS.json RESULTS.json

JOBS.json is a list of {"id", "args"}. Run from an empty folder: the results
list, per job, the exit code, stdout, stderr, seconds, any exception that
escaped `main`, what an audit hook saw that loading must never do (a process
started, a file written outside $TMPDIR, an unpickling, ...), and files that
appeared in the current folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback


def _listing(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in dirs + files]
    return sorted(found)


def main(jobs_path: str, results_path: str) -> None:
    from click.testing import CliRunner

    # The fuzzer lives in tests/, beside this folder.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzer import EscapeWatch

    from reprokit._cli import main as cli

    with open(jobs_path) as file:
        jobs = json.load(file)
    watch = EscapeWatch(tempfile.gettempdir())
    # Jobs flagged "warm" (the valid control archive) run before the hook
    # watches, so that jax's and penzai's lazy imports are not counted.
    sys.addaudithook(watch.hook)
    cwd = os.getcwd()
    runner = CliRunner()
    results = []
    for job in jobs:
        before = _listing(cwd)
        started = time.monotonic()
        if job.get("warm"):
            result = runner.invoke(cli, job["args"], prog_name="reprokit")
            seen: list[str] = []
        else:
            with watch.watching() as seen:
                result = runner.invoke(cli, job["args"], prog_name="reprokit")
        seconds = time.monotonic() - started
        unexpected = None
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            unexpected = "".join(traceback.format_exception(*result.exc_info))[-2000:]
        results.append(
            {
                "id": job["id"],
                "exit_code": result.exit_code,
                "stdout": result.stdout[-4000:],
                "stderr": result.stderr,
                "seconds": seconds,
                "unexpected": unexpected,
                "escapes": list(seen),
                "new_files": sorted(set(_listing(cwd)) - set(before)),
            }
        )
    with open(results_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
