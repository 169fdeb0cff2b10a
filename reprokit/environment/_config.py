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
import re
import subprocess
import sys
from collections.abc import Iterator

from reprokit._errors import ReplayError
from reprokit.environment._snapshot import _XLA_FLAG_TOKEN
from reprokit.portable._jax_config import PLACEHOLDER

__all__ = [
    "REPLAYED_XLA_FLAGS",
    "check_xla_flags",
    "replayable_xla_flags",
    "restored_jax_config",
    "xla_flag_note",
]


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


# The XLA flags a replay applies (SECURITY.md, class 4): those that change
# numerical results or how many devices exist. Every other recorded flag (dump
# and cache locations, profilers, autotuning files, anything a later XLA adds)
# is reported as not applied: no recorded flag can make XLA read or write a
# file on the maintainer's machine.
REPLAYED_XLA_FLAGS = frozenset(
    {
        "xla_allow_excess_precision",
        "xla_backend_optimization_level",
        "xla_cpu_enable_fast_math",
        "xla_cpu_enable_fast_min_max",
        "xla_cpu_fast_math_honor_division",
        "xla_cpu_fast_math_honor_functions",
        "xla_cpu_fast_math_honor_infs",
        "xla_cpu_fast_math_honor_nans",
        "xla_cpu_multi_thread_eigen",
        "xla_cpu_strict_dot_conv_math",
        "xla_cpu_use_thunk_runtime",
        "xla_disable_hlo_passes",
        "xla_enable_fast_math",
        "xla_force_host_platform_device_count",
        "xla_gpu_autotune_level",
        "xla_gpu_deterministic_ops",
        "xla_gpu_enable_cublaslt",
        "xla_gpu_enable_fast_min_max",
        "xla_gpu_enable_triton_gemm",
        "xla_gpu_exclude_nondeterministic_ops",
        "xla_gpu_strict_conv_algorithm_picker",
    }
)


def replayable_xla_flags(flags: list[str]) -> tuple[list[str], list[str]]:
    """Split recorded XLA flags into (worth replaying, left out; `xla_flag_note` says why).

    Only flags named in `REPLAYED_XLA_FLAGS` are replayed. A flag whose value
    was replaced by a placeholder (`<path>`, `<home>`, `<redacted>`...)
    pointed at the packing machine; setting it here would create directories
    with those literal names or pass a meaningless value.
    """
    keep: list[str] = []
    drop: list[str] = []
    for flag in flags:
        name, _, value = flag.partition("=")
        replayed = name.removeprefix("--") in REPLAYED_XLA_FLAGS
        (keep if replayed and not PLACEHOLDER.search(value) else drop).append(flag)
    return keep, drop


def xla_flag_note(flag: str) -> str:
    """Why a recorded XLA flag that `replayable_xla_flags` left out is not applied."""
    from reprokit.archive._format import one_line

    shown = one_line(flag[:120])
    if PLACEHOLDER.search(flag.partition("=")[2]):
        return f"recorded XLA flag {shown} names the reporter's machine; left out"
    return f"recorded XLA flag {shown} is not a numerics flag reprokit replays; not applied"


_PROBE = "import jax; jax.devices()"
_PROBE_TIMEOUT_S = 60.0


_UNKNOWN_FLAGS = re.compile(r"Unknown flags? in XLA_FLAGS: (.*)")


def _probe(flags: list[str], timeout: float) -> tuple[bool, set[str] | None]:
    """(jax started, the flags XLA named unknown or None) for one child with `flags` set."""
    from reprokit._workers import python_command, worker_env

    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(flags)
    try:
        result = subprocess.run(
            python_command(code=_PROBE),  # isolated, as every child interpreter
            env=worker_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, None
    if result.returncode == 0:
        return True, set()
    found = _UNKNOWN_FLAGS.search(result.stderr or "")
    return False, set(found.group(1).split()) if found else None


def _flags_start_jax(flags: list[str], timeout: float) -> bool:
    return _probe(flags, timeout)[0]


def check_xla_flags(
    flags: list[str], timeout: float = _PROBE_TIMEOUT_S
) -> tuple[list[str], list[str]]:
    """Return (accepted, rejected) XLA flags on this machine.

    XLA aborts a process that starts with an unknown flag in `XLA_FLAGS`, so
    each test runs `import jax; jax.devices()` in a child interpreter with this
    process's environment and `XLA_FLAGS` replaced. All flags are tried
    together in one child (one start-up, about half a second); when XLA
    names unknown flags, one more child confirms the rest. Only when a child
    fails without naming any is each flag tried alone, in parallel, each
    bounded by `timeout` seconds (callers pass only `REPLAYED_XLA_FLAGS`). Tokens not
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
    if not accepted:
        return accepted, rejected
    # One child for all flags: XLA names every unknown flag in one message
    # before it exits, so a second child only confirms the rest (250 flags
    # once took 250 children and 73 s).
    started, unknown = _probe(accepted, timeout)
    if started:
        return accepted, rejected
    if unknown:
        rest = [flag for flag in accepted if flag not in unknown]
        if not rest or _flags_start_jax(rest, timeout):
            return rest, rejected + [flag for flag in accepted if flag in unknown]
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
