"""Measuring helpers: cold page cache, warm RAM, peak RSS, medians.

Three facts about this kind of machine (a 2-core VM) decide how the
benchmarks measure, and each is handled here rather than in every benchmark:

* **Cold reads.** A read is only "cold" if the file is not in the page
  cache. As root, `drop_cold` syncs and writes 3 to /proc/sys/vm/drop_caches
  (the whole cache); otherwise it asks the kernel to drop each file's pages
  with posix_fadvise(POSIX_FADV_DONTNEED). Which one ran is reported.
* **First touch of idle RAM.** Memory the guest freed a few seconds ago is
  handed back to the host (free page reporting); touching it again costs
  1-2 s/GiB, more than the disk. `warm(n)` touches and frees n bytes right
  before a timed operation, so that every method gets warm pages; without it
  the same write varies 0.5-3 s.
* **Peak RSS.** `getrusage` reports the process's peak since it started and,
  for a child started with vfork, includes the parent's peak. `PeakRSS`
  therefore resets the kernel's high-water mark (/proc/self/clear_refs, 5)
  and reads VmHWM; getrusage's ru_maxrss is the fallback where /proc is
  missing.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = [
    "PeakRSS",
    "cold_method",
    "drop_cold",
    "machine_load",
    "median",
    "rss",
    "timed",
    "warm",
]

_DROP_CACHES = "/proc/sys/vm/drop_caches"
_cold_method: str | None = None


def median(values: Iterable[float]) -> float:
    """Median of the values (nan when empty)."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def rss() -> int:
    """Current resident set size in bytes."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Context manager: `.extra` is the peak RSS inside the block minus RSS at its start.

    Uses the kernel's resettable high-water mark (VmHWM after writing 5 to
    /proc/self/clear_refs); without it, getrusage's ru_maxrss, which is only
    right when the block holds the process's largest peak so far.
    """

    method = "VmHWM after clear_refs"

    def __enter__(self) -> PeakRSS:
        self.resettable = True
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
        except OSError:
            self.resettable = False
        self.start = rss()
        self.extra = 0
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _vm_hwm() if self.resettable else None
        if peak is None:
            PeakRSS.method = "getrusage ru_maxrss"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra = max(0, peak - self.start)


def warm(nbytes: int) -> None:
    """Touch and free `nbytes` of RAM, so the next allocations get pages the host has backed."""
    if nbytes > 0:
        block = np.ones(nbytes // 8 + 1)
        del block


def _paths_under(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                out.extend(os.path.join(root, name) for name in files)
        elif os.path.exists(path):
            out.append(path)
    return out


def drop_cold(paths: Iterable[str]) -> str:
    """Evict `paths` (files or folders) from the page cache; returns the method used."""
    global _cold_method
    os.sync()
    if _cold_method in (None, "drop_caches"):
        try:
            with open(_DROP_CACHES, "w") as file:
                file.write("3")
            _cold_method = "drop_caches"
            return _cold_method
        except OSError:
            _cold_method = "fadvise"
    for path in _paths_under(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def cold_method() -> str:
    """How `drop_cold` evicts: "drop_caches" (whole page cache) or "fadvise" (per file)."""
    if _cold_method is None:
        return "drop_caches" if os.access(_DROP_CACHES, os.W_OK) else "fadvise"
    return _cold_method


def timed(fn: Callable[[], Any], *, warm_bytes: int = 0) -> tuple[float, int, Any]:
    """Runs `fn` once after warming RAM; returns (seconds, peak extra RSS in bytes, result)."""
    gc.collect()
    warm(warm_bytes)
    with PeakRSS() as peak:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    return elapsed, peak.extra, result


def machine_load() -> dict:
    """Load average and CPU pressure: other work on the machine skews every ratio."""
    info: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/pressure/cpu") as file:
            some = file.readline().split()
            info["cpu_pressure_avg10"] = float(some[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return info
