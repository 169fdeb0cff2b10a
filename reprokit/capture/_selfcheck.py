"""Self-check at pack time: replay the finished archive as a maintainer would.

"The repro does not reproduce" is the most common complaint about repro
tools. Before `pack` returns, the archive is replayed in a fresh interpreter
with `reprokit run` semantics (caches off), and the result travels inside
the archive (`selfcheck.json`), so a maintainer sees "reproduced on the
reporter's machine after packing: yes" beside their own verdict. The check
also replays in the other mode (eager vs jit): a bug that only shows in one
mode is a common trap, and saying so at pack time saves a round trip.
"""

from __future__ import annotations

import json
import os
import sys
import time

from reprokit._workers import WorkerFailed, run_worker
from reprokit.archive._container import Limits
from reprokit.archive._trust import TrustPolicy

_TIMEOUT_S = 900


def self_check(
    path: str, trust: TrustPolicy | None = None, timeout: float = _TIMEOUT_S
) -> dict:
    """Replays `path` in a fresh process; returns what it measured (never raises for a failed replay).

    `trust` is what the replay allows: the reporter's own modules and, when
    the archive bundles the reporter's code (`--bundle-code`), that code,
    which this check, run by that reporter, imports from the archive.
    """
    args = [path, *(trust or TrustPolicy()).to_argv()]
    env = dict(os.environ)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    started = time.perf_counter()
    try:
        # The reporter's own modules must import as they did in this process:
        # the worker is isolated (`python -I`) but appends this process's
        # import path, the reporter's current folder included.
        result = run_worker(
            "reprokit.capture._selfcheck", args, env=env, timeout=timeout, keep_cwd=True
        )
    except WorkerFailed as error:
        return {"ran": False, "error": f"the replay failed: {error}"}
    elapsed = time.perf_counter() - started
    result["elapsed_s"] = round(elapsed, 3)
    return result


def describe(result: dict, mode: str) -> list[str]:
    """Lines for the pack summary: loud when the archive does not reproduce."""
    if not result.get("ran"):
        return [
            f"  self-check: could not replay the archive in a fresh process: {result.get('error')}"
        ]
    lines = []
    if result["reproduced"] and result.get("signature_kind") == "exception":
        # An exception archive has no output: the same exception is what reproduced.
        lines.append("  self-check: reproduced in a fresh process (the same exception)")
    elif result["reproduced"]:
        equal = "bitwise equal" if result.get("output_bitwise_equal") else "not bitwise equal"
        lines.append(
            f"  self-check: reproduced in a fresh process (output {equal} to the recorded one)"
        )
    else:
        lines.append("  WARNING: self-check: the archive does NOT reproduce in a fresh process")
        lines.append(f"    why: {result.get('reason')}")
    for problem in result.get("config_problems", []):
        lines.append(f"    note: {problem}")
    other = result.get("other_mode") or {}
    if other.get("ran") and not other.get("same_as_recorded_mode"):
        detail = (
            f"max abs error {other['max_abs_error']:.3g}"
            if other.get("max_abs_error")
            else other.get("reason", "")
        )
        reproduces = "still reproduces" if other.get("reproduced") else "does NOT reproduce"
        lines.append(
            f"    note: captured {mode}; {other['mode']} replay differs ({detail}) and {reproduces}. "
            f"Maintainers must replay {mode}, as reprokit run does."
        )
    return lines


def _main(argv: list[str]) -> int:
    path, *rest = argv
    from reprokit.portable._verdict import json_ready, judge
    from reprokit.replaying._replay import (
        load_archive,
        recorded_outcome,
        replay_loaded,
        replayed_outcome,
    )

    try:
        # The writer's snapshot: the one archive that says it is unfinished.
        loaded = load_archive(
            path, TrustPolicy.from_argv(rest), limits=Limits(accept_unfinished=True)
        )
        verdict = replay_loaded(loaded)
        recorded_mode = loaded.manifest["mode"]
        other_mode = "eager" if recorded_mode == "jit" else "jit"
        other = judge(
            loaded.manifest["signature"],
            recorded_outcome(loaded),
            replayed_outcome(loaded, mode=other_mode),
        )
        differs = [r for r in other["output"] if r["status"] == "differs"]
        result = {
            "ran": True,
            "signature_kind": loaded.manifest["signature"]["kind"],
            "reproduced": verdict.reproduced,
            "reason": verdict.details["reason"],
            "output_bitwise_equal": verdict.details["output_bitwise_equal"],
            "state_bitwise_equal": verdict.details["state_bitwise_equal"],
            "config_problems": list(loaded.config_problems),
            "other_mode": {
                "ran": True,
                "mode": other_mode,
                "reproduced": bool(other["reproduced"]),
                "reason": other["reason"],
                "same_as_recorded_mode": bool(other["output_bitwise_equal"])
                and (other["replayed_exception"] == verdict.details["replayed_exception"]),
                "max_abs_error": max((r["max_abs_error"] for r in differs), default=None),
            },
        }
    except Exception as error:  # reported to the reporter, who can rerun with --no-check
        result = {"ran": False, "error": " ".join(f"{type(error).__name__}: {error}".split())[:300]}
    print(json.dumps(json_ready(result), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
