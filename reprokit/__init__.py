"""reprokit: turn a failing JAX/penzai layer into one small archive anyone can replay.

Reporter, inside the failing run::

    sel = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(2)
    reprokit.pack(sel, tokens, side_inputs={"token_positions": pos}, out="attn-nan.repro.zip")

Maintainer, on any machine::

    reprokit run attn-nan.repro.zip          # or: reprokit.replay("attn-nan.repro.zip")

Public names are imported lazily so that `import reprokit` (and the CLI's
`inspect`) stays cheap: jax and penzai load only when something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from reprokit._errors import (
    ArchiveError,
    CaptureError,
    RefusedTypeError,
    ReplayError,
    ReprokitError,
    UsageError,
)

if TYPE_CHECKING:
    from reprokit.bisecting._bisect import BisectResult, BisectRow, bisect
    from reprokit.capture._find import FindResult, find, search
    from reprokit.capture._pack import PackResult, pack
    from reprokit.capture._watch import FaultDetected, Watched, watch
    from reprokit.capture._watch_training import TrainingWatch, watch_training
    from reprokit.replaying._replay import LoadedArchive, Verdict, load, replay

_LAZY = {
    "bisect": "reprokit.bisecting._bisect",
    "BisectResult": "reprokit.bisecting._bisect",
    "BisectRow": "reprokit.bisecting._bisect",
    "find": "reprokit.capture._find",
    "search": "reprokit.capture._find",
    "FindResult": "reprokit.capture._find",
    "watch": "reprokit.capture._watch",
    "Watched": "reprokit.capture._watch",
    "FaultDetected": "reprokit.capture._watch",
    "watch_training": "reprokit.capture._watch_training",
    "TrainingWatch": "reprokit.capture._watch_training",
    "pack": "reprokit.capture._pack",
    "PackResult": "reprokit.capture._pack",
    "load": "reprokit.replaying._replay",
    "replay": "reprokit.replaying._replay",
    "LoadedArchive": "reprokit.replaying._replay",
    "Verdict": "reprokit.replaying._replay",
}

__all__ = [
    "ArchiveError",
    "BisectResult",
    "BisectRow",
    "CaptureError",
    "FaultDetected",
    "FindResult",
    "LoadedArchive",
    "PackResult",
    "RefusedTypeError",
    "ReplayError",
    "ReprokitError",
    "TrainingWatch",
    "UsageError",
    "Verdict",
    "Watched",
    "bisect",
    "find",
    "load",
    "pack",
    "replay",
    "search",
    "watch",
    "watch_training",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'reprokit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
