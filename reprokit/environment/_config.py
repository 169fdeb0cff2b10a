"""Restore the packing machine's settings on replay, only where it is safe.

The recorded jax config is restored by `reprokit.portable._jax_config` (one
implementation, shared with the archive's `replay.py`). This module holds the
rest of the replay side: putting jax's process-wide config back after an
in-process replay, and the recorded XLA flags, which this machine's XLA may
not know: an unknown flag in `XLA_FLAGS` aborts the process, so each is tried
in a child interpreter before a replay sets it, and flags whose value pointed
at the packing machine (`--xla_dump_to=<path>`) are left out.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

from reprokit._errors import ReplayError
from reprokit.environment._snapshot import _XLA_FLAG_TOKEN
from reprokit.portable._jax_config import PLACEHOLDER

__all__ = ["check_xla_flags", "replayable_xla_flags", "restored_jax_config"]


@contextlib.contextmanager
def restored_jax_config() -> Iterator[None]:
    """Puts back every jax config value that changed inside the block (they are process-wide).

    Replaying an archive in-process applies its recorded config; callers that
    replay many archives (fuzzing, regression tests) undo it afterwards. A
    value jax no longer accepts stays as the archive set it.
    """
    import jax

    before = dict(jax.config.values)
    try:
        yield
    finally:
        for name, value in before.items():
            now = jax.config.values.get(name)
            if now is value or (type(now) is type(value) and now == value):
                continue
            with contextlib.suppress(Exception):
                jax.config.update(name, value)


def replayable_xla_flags(flags: list[str]) -> tuple[list[str], list[str]]:
    """Split recorded XLA flags into (worth replaying, machine-specific).

    A flag whose value was replaced by a placeholder (`<path>`, `<home>`,
    `<redacted>`...) pointed at the packing machine; setting it here would
    create directories with those literal names or pass a meaningless value.
    """
    keep: list[str] = []
    drop: list[str] = []
    for flag in flags:
        value = flag.partition("=")[2]
        (drop if PLACEHOLDER.search(value) else keep).append(flag)
    return keep, drop


_PROBE = "import jax; jax.devices()"
_PROBE_TIMEOUT_S = 60.0


def _flags_start_jax(flags: list[str], timeout: float) -> bool:
    from reprokit._workers import python_command, worker_env

    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(flags)
    try:
        result = subprocess.run(
            python_command(code=_PROBE),  # isolated, as every child interpreter
            env=worker_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def check_xla_flags(
    flags: list[str], timeout: float = _PROBE_TIMEOUT_S
) -> tuple[list[str], list[str]]:
    """Return (accepted, rejected) XLA flags on this machine.

    XLA aborts a process that starts with an unknown flag in `XLA_FLAGS`, so
    each test runs `import jax; jax.devices()` in a child interpreter with this
    process's environment and `XLA_FLAGS` replaced. All flags are tried
    together first (one start-up, about half a second); if that fails, each
    flag alone, in parallel, each bounded by `timeout` seconds. Tokens not
    shaped like `--xla_name[=value]`, and flags whose value was replaced by a
    placeholder when packed (`--xla_dump_to=<path>`: XLA would accept it and
    dump into a folder of that name; see `replayable_xla_flags`), are
    rejected without running anything.
    An empty list costs nothing. Flags accepted one by one are not re-tested
    together.

    Raises:
        ReplayError: when jax cannot start in a child process even without
            flags, so the flags cannot be judged.
    """
    accepted: list[str] = []
    rejected: list[str] = []
    for flag in dict.fromkeys(flags):
        usable = _XLA_FLAG_TOKEN.match(flag) and not PLACEHOLDER.search(flag)
        (accepted if usable else rejected).append(flag)
    if not accepted or _flags_start_jax(accepted, timeout):
        return accepted, rejected
    if len(accepted) == 1:
        results = [False]
    else:
        workers = min(len(accepted), max(2, os.cpu_count() or 2), 8)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda f: _flags_start_jax([f], timeout), accepted))
    if not any(results) and not _flags_start_jax([], timeout):
        raise ReplayError(
            f"cannot judge XLA flags: '{sys.executable} -c \"{_PROBE}\"' fails even "
            "without XLA_FLAGS; check that jax imports in this environment"
        )
    good = [f for f, ok in zip(accepted, results, strict=True) if ok]
    bad = [f for f, ok in zip(accepted, results, strict=True) if not ok]
    return good, rejected + bad
