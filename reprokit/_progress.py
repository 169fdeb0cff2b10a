"""Progress on long work: a bar on a terminal, silence everywhere else.

Packing a multi-gigabyte layer or sweeping a dozen replay conditions takes
long enough that a person at a terminal deserves to see it move; logs, CI
and `--json`/`--quiet` runs get nothing. Short work (under a threshold)
shows no bar either, so quick commands stay one clean screen.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

# Set by the CLI for --quiet and --json.
silenced = False


def _wanted(total: float, threshold: float) -> bool:
    if silenced or total < threshold or os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress(total: float, label: str, *, threshold: float = 0) -> Iterator[Callable[[float], None]]:
    """Yields `advance(amount)`; draws a bar on stderr only for a terminal and enough work."""
    if not _wanted(total, threshold):
        yield lambda amount=1: None
        return
    import click

    with click.progressbar(length=int(total), label=label, file=sys.stderr) as bar:
        yield lambda amount=1: bar.update(int(amount))
