"""`collector_paused`: Python's cyclic garbage collector paused around big tree work.

Packing, loading, parsing a structure, computing inspect's statistics and
writing `replay.py` each build one object or more per array: with 100,000
arrays, the collector's full passes (each walks everything alive, jax's own
state included) cost more than the work and made it grow faster than the
array count. What these build holds no cycles, and reference counting goes
on, so the collector is paused for the block and what was left in cycles is
collected after it. It lives in the archive layer, which everything else may
import, so that there is one such switch.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector for the block, as it was found on exit."""
    collecting = gc.isenabled()
    try:
        gc.disable()  # inside the try: a signal can never leave it disabled
        yield
    finally:
        if collecting:
            gc.enable()
