"""Fresh-interpreter workers that answer with one line of JSON.

Some checks must run in a new process: the self-check replays an archive as
a maintainer would, and sweep conditions such as x64 or XLA flags only take
effect before jax starts. Each worker is `python -m reprokit.MODULE ARGS`,
prints a JSON object as its last stdout line, and this module runs it with a
timeout and turns every way it can fail into one short message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence

from reprokit.archive._container import Limits

_LIMIT_FLAG = "--limit"


class WorkerFailed(Exception):
    """The worker timed out, crashed, or printed no JSON; the message says which."""


# A child interpreter starts isolated (`python -I`: no current folder or
# script folder on sys.path, no PYTHON* variables, no user site), so that a
# file in the folder it starts from (say one extracted from an archive, such
# as a planted `json.py`) can never be imported (SECURITY.md, class 3). The
# parent's own import path is handed over explicitly and appended, after the
# standard library and installed packages, which nothing can then shadow;
# the current folder is left out unless the caller keeps it (the self-check,
# which runs on the reporter's side with the reporter's own classes).
_BOOT = (
    "import json, os, runpy, site, sys\n"
    # Dies with its parent (SECURITY.md, class 8): Linux's parent-death signal,
    # then a check that the parent did not die before it was set.
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(os.environ.pop('REPROKIT_PARENT_PID', os.getppid())):\n"
    "    os._exit(1)\n"
    "for p in json.loads(os.environ.pop('REPROKIT_WORKER_PATH', '[]')):\n"
    "    if p not in sys.path:\n"
    "        (site.addsitedir if os.path.basename(p) in ('site-packages', 'dist-packages') "
    "else sys.path.append)(p)\n"
    "what = sys.argv.pop(1)\n"
    "if what == '-c':\n"
    "    code = sys.argv.pop(1)\n"
    "    exec(compile(code, '<reprokit probe>', 'exec'), {'__name__': '__main__'})\n"
    "else:\n"
    "    runpy.run_module(what, run_name='__main__', alter_sys=True)\n"
)
_PATH_VARIABLE = "REPROKIT_WORKER_PATH"


def python_command(
    module: str | None = None, *, code: str | None = None, args: Sequence[str] = ()
) -> list[str]:
    """The argv of an isolated child interpreter running `-m MODULE ARGS` or `-c CODE ARGS`.

    Run it with `worker_env(...)`, which carries the parent's import path.
    """
    if (module is None) == (code is None):
        raise ValueError("give exactly one of module and code")
    what = [module] if module is not None else ["-c", code]
    return [sys.executable, "-I", "-c", _BOOT, *what, *args]


def worker_env(env: dict | None = None, *, keep_cwd: bool = False) -> dict:
    """`env` (default: this process's) plus the import path an isolated child appends."""
    env = dict(os.environ if env is None else env)
    here = os.path.realpath(os.getcwd())
    paths = []
    for entry in sys.path:
        if not entry:
            continue  # '': the current folder
        absolute = os.path.realpath(entry)
        if absolute == here and not keep_cwd:
            continue
        if absolute not in paths:
            paths.append(absolute)
    env[_PATH_VARIABLE] = json.dumps(paths)
    env["REPROKIT_PARENT_PID"] = str(os.getpid())
    return env


def run_worker(
    module: str,
    args: list[str],
    *,
    env: dict | None,
    timeout: float,
    keep_cwd: bool = False,
    input: bytes | None = None,
) -> dict:
    """Runs `python -I -m MODULE ARGS` (isolated) and returns the JSON object it printed last.

    `input`, if given, is the child's standard input (else it reads nothing).
    """
    try:
        done = subprocess.run(
            python_command(module, args=args),
            capture_output=True,
            env=worker_env(env, keep_cwd=keep_cwd),
            timeout=timeout,
            **({"input": input} if input is not None else {"stdin": subprocess.DEVNULL}),
        )
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"took longer than {timeout:.0f} s") from None
    stdout = done.stdout.decode("utf-8", "replace")
    stderr = done.stderr.decode("utf-8", "replace")
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        if done.returncode < 0:
            raise WorkerFailed(f"the worker process crashed (signal {-done.returncode})") from None
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise WorkerFailed(" ".join(last.split())[:300]) from None
    if not isinstance(result, dict):
        raise WorkerFailed("printed JSON that is not an object")
    return result


def limits_to_argv(limits: Limits | None) -> list[str]:
    """The caller's archive limits as a worker's arguments, so the worker reads under them too."""
    if limits is None:
        return []
    default = Limits()
    return [
        arg
        for field in dataclasses.fields(Limits)
        if getattr(limits, field.name) != getattr(default, field.name)
        for arg in (_LIMIT_FLAG, f"{field.name}={getattr(limits, field.name)!r}")
    ]


def limits_from_argv(args: Sequence[str]) -> Limits:
    """The limits `limits_to_argv` wrote (defaults for the rest); other arguments are ignored."""
    default = Limits()
    values = {}
    for flag, value in zip(args, args[1:], strict=False):
        if flag == _LIMIT_FLAG:
            name, _, text = value.partition("=")
            kind = type(getattr(default, name))
            values[name] = text == "True" if kind is bool else kind(text)
    return Limits(**values)
