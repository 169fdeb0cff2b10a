"""Arrays of a multi-process archive, read in place from its orbax checkpoint.

A capture from several processes stores its arrays as an orbax checkpoint
inside the zip (see `reprokit.archive._checkpoint` for its checks).
Replay needs one process only: tensorstore reads each array through the
`zip` kvstore driver, after every member's CRC has been checked.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from reprokit._errors import ArchiveError
from reprokit.archive._checkpoint import CHECKPOINT_PREFIX, section


class CheckpointArrays:
    """Reads arrays of an archive's checkpoint with tensorstore, in place inside the zip."""

    def __init__(self, opened: Any):
        self._opened = opened
        self._verified = False
        self._driver = section(opened.manifest)["checkpoint"]["driver"]

    def read(self, desc: dict) -> np.ndarray:
        """The array's bytes as a flat uint8 buffer, checked against its descriptor."""
        import tensorstore as ts

        from reprokit.portable._arrays import dtype_from_name

        if not self._verified:
            # tensorstore reads the members itself: check every CRC first.
            for name in self._opened.reader.names:
                if name.startswith(CHECKPOINT_PREFIX):
                    self._opened.reader.verify_member(name)
            self._verified = True
        spec = {
            "driver": self._driver,
            "kvstore": {
                "driver": "ocdbt",
                "base": {
                    "driver": "zip",
                    "path": CHECKPOINT_PREFIX,
                    "base": {"driver": "file", "path": os.path.abspath(self._opened.path)},
                },
                "path": desc["checkpoint"] + "/",
            },
        }
        key = desc["checkpoint"]
        try:
            store = ts.open(spec, open=True, read=True).result()
            shape, dtype = list(store.shape), np.dtype(store.dtype.numpy_dtype)
            chunk = list(store.chunk_layout.read_chunk.shape or shape)
        except Exception as error:  # tensorstore raises ValueError and its own types
            raise ArchiveError(f"checkpoint array {key}: cannot be opened ({error})") from None
        if shape != desc["shape"] or dtype != dtype_from_name(desc["dtype"]):
            raise ArchiveError(f"checkpoint array {key} does not match its descriptor")
        if len(chunk) != len(shape) or any(
            c > max(s, 1) for c, s in zip(chunk, shape, strict=True)
        ):
            # A chunk larger than the array would let a tiny member inflate without bound.
            raise ArchiveError(f"checkpoint array {key} has chunks larger than the array")
        try:
            data = store.read(order="C").result()
        except Exception as error:
            raise ArchiveError(f"checkpoint array {key}: cannot be read ({error})") from None
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
