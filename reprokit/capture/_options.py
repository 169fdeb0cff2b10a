"""`PackOptions`: how to pack a call, as one value built once.

The same choices (the maintainer's note, the recorded issue, the reporter's
own modules, the self-check, redaction, a size limit, bundled code,
compression, and for `pack` which call and mode to capture and how several
processes store their shards) reach the archive writer from five entry
points: `reprokit.pack`, `reprokit pack` (and its `--find` path),
`FindResult.pack`, `reprokit.watch` and the benchmarks. Spelled out as
keyword lists they drifted apart one entry point at a time; as one frozen
value each entry point builds it once, from its own arguments, and hands it
on unchanged through `pack`, the multi-process path, `pack_found` and
`write_archive`.

`allow_modules` stays a plain tuple here: at pack time it names the
reporter's own modules for the encoder (which refuses what the loader would
refuse, with pack's error), and only the self-check, which replays the
archive as a maintainer would, turns it into a `TrustPolicy`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class PackOptions:
    """What `reprokit.pack` takes besides the model and where to write (see `reprokit.pack`).

    Attributes:
      note: free text for the maintainer.
      call: which call of the layer to pack (0-based); None: the first that
        misbehaves. `find` and `watch` choose the call themselves.
      signature: the recorded issue ("exception", "nonfinite", "output");
        None: detected.
      mode: "eager" or "jit" for the capture and replay; None: as the model
        runs. `find` and `watch` choose the mode themselves.
      allow_modules: the reporter's own modules that hold classes or
        functions in the model.
      check: replay the finished archive in a fresh process (the self-check).
      redact: private values to replace (e.g. ["params=random"]).
      max_size: a size the archive must fit (e.g. "25MB").
      bundle_code: copy the reporter's own code the layer needs into the archive.
      compress: deflate the array members that shrink by a tenth or more.
      gather: several jax processes: gather arrays instead of checkpointing them.
      shards_dir: several jax processes: the folder all of them can reach.
    """

    note: str = ""
    call: int | None = None
    signature: str | None = None
    mode: str | None = None
    allow_modules: tuple[str, ...] = ()
    check: bool = True
    redact: Any = None
    max_size: str | int | None = None
    bundle_code: bool = False
    compress: bool = False
    gather: bool = False
    shards_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_modules", tuple(self.allow_modules or ()))
        if self.shards_dir is not None:
            object.__setattr__(self, "shards_dir", os.fspath(self.shards_dir))
