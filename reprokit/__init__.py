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
    from reprokit._find import FindResult, find, search
    from reprokit._pack import PackResult, pack
    from reprokit._replay import LoadedArchive, Verdict, load, replay
    from reprokit._watch import FaultDetected, Watched, watch

_LAZY = {
    "find": "reprokit._find",
    "search": "reprokit._find",
    "FindResult": "reprokit._find",
    "watch": "reprokit._watch",
    "Watched": "reprokit._watch",
    "FaultDetected": "reprokit._watch",
    "pack": "reprokit._pack",
    "PackResult": "reprokit._pack",
    "load": "reprokit._replay",
    "replay": "reprokit._replay",
    "LoadedArchive": "reprokit._replay",
    "Verdict": "reprokit._replay",
}

__all__ = [
    "ArchiveError",
    "CaptureError",
    "FaultDetected",
    "FindResult",
    "LoadedArchive",
    "PackResult",
    "RefusedTypeError",
    "ReplayError",
    "ReprokitError",
    "UsageError",
    "Verdict",
    "Watched",
    "find",
    "load",
    "pack",
    "replay",
    "search",
    "watch",
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
