"""The zip container behind `.repro.zip` files: aligned writes, paranoid reads.

A reprokit archive is a plain zip so that anyone can look inside it with
`unzip`, but two things about it are unusual and are why this module writes
zips itself instead of using `zipfile`:

* Array members are stored uncompressed with their data starting at a file
  offset that is a multiple of `ALIGNMENT` (padding goes into the local
  header's extra field, in the record Android's apksigner uses). A reader can then
  `readinto` an aligned numpy buffer straight from the file, and the buffer
  can be handed to the accelerator runtime without another copy.
* The CRC-32 of a large member is computed chunk by chunk while the chunk is
  written (or read), on a helper thread, instead of in a separate pass.

Archives arrive as attachments on bug reports, so the reading side treats
them as hostile: `ArchiveReader` parses the central directory and every local
header itself and refuses anything odd (unsafe names, links, encryption,
exotic compression, overlapping or out-of-file data, sizes beyond `Limits`)
with an `ArchiveError` before any member is used. Later integrity problems
(CRC or size mismatches) are also reported as `ArchiveError`, so callers only
ever see that one error type for a bad archive.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import encodings.cp437  # noqa: F401 (see _decode_name)
import errno
import hashlib
import itertools
import os
import re
import secrets
import stat
import struct
import sys
import threading
import unicodedata
import weakref
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from reprokit._errors import ArchiveError

__all__ = [
    "ALIGNMENT",
    "ArchiveReader",
    "ArchiveWriter",
    "Limits",
    "is_safe_member_name",
]

ALIGNMENT = 64

# Record layouts from PKWARE's APPNOTE.TXT (sections 4.3.7, 4.3.12, 4.3.14-16).
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_EXTRA_HEADER = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_SIG_LOCAL = 0x04034B50
_SIG_CENTRAL = 0x02014B50
_SIG_EOCD = 0x06054B50
_SIG_EOCD64 = 0x06064B50
_SIG_LOCATOR64 = 0x07064B50

_STORED = 0
_DEFLATED = 8

_FLAG_ENCRYPTED = 0x0001
_FLAG_DATA_DESCRIPTOR = 0x0008
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_FLAG_MASKED_HEADERS = 0x2000
_ANY_ENCRYPTION = _FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_MASKED_HEADERS

# The archive comment of a snapshot (see Limits.accept_unfinished).
UNFINISHED_COMMENT = b"reprokit: unfinished archive (a snapshot for the self-check)"

_EXTRA_ZIP64 = 0x0001
# Android's alignment record (2-byte alignment, then zero padding): an id that
# existing tools already know to skip, rather than one made up here.
_EXTRA_ALIGNMENT = 0xD935
_ALIGNMENT_RECORD_MIN = 6

_MAX16 = 0xFFFF
_MAX32 = 0xFFFFFFFF

_VERSION_DEFAULT = 20
_VERSION_ZIP64 = 45
_VERSION_MADE_BY = (3 << 8) | _VERSION_ZIP64  # 3: unix, so unzip applies the mode
_REGULAR_FILE_ATTR = (stat.S_IFREG | 0o644) << 16
_MSDOS_DIRECTORY_ATTR = 0x10
# Every member gets 1980-01-01 00:00 so that packing the same inputs twice
# gives byte-identical archives (and identical sha256 sums in bug reports).
_DOS_TIME = 0
_DOS_DATE = (1 << 5) | 1

# Chunk size for streaming members; big enough that per-chunk overhead is
# noise, small enough that a chunk stays in cache between write and CRC.
_CHUNK = 8 * 2**20
# Below this, handing a chunk to the CRC thread costs more than it saves.
_PIPELINE_MIN = 2 * _CHUNK
# Members up to this size are copied behind their header to save a system
# call; larger ones are written straight from the caller's buffer.
_COALESCE_MAX = 64 * 2**10
# Local headers closer together than this are read with one read.
_HEADER_WINDOW = 64 * 2**10
# Every this many bytes written, the kernel is asked to start writing them to
# disk (Linux sync_file_range), so the disk works while later chunks are
# copied and checksummed and the final fsync finds little left. At 1 GiB on
# a 2-core VM (benchmarks/) this took the writer from 1.75x to 1.07x a plain
# write+fsync (a 64 MiB step: 1.55x).
_WRITEBACK_STEP = 32 * 2**20
# The ratio limit is only applied to members declaring more than this many
# bytes: tiny, repetitive text members legitimately compress very well, and a
# bomb needs a large declared size to do harm anyway.
_RATIO_FLOOR = 64 * 2**10
# Per-entry budget for the extra field and comment of a central directory
# record; bounds how much central directory a member count may claim.
_MAX_ENTRY_EXTRA = 4096

_DEFAULT_MAX_NAME_LENGTH = 255
_C0_C1_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Line separators, bidi overrides, zero-width characters and lone surrogates
# can make a name display as a different name in messages and listings.
_DECEPTIVE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

_FILE_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory entry",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Hard limits checked before anything is read; defaults sane, raisable by flags."""

    # An archive of N arrays has N + 5 members or so: 200,000 admits the
    # 100,000 arrays that `structure.msgpack`'s own cap allows (~80 bytes each).
    max_members: int = 200_000
    # Manifest, structure and text members are read fully into memory.
    max_small_member_bytes: int = 64 * 2**20
    # Sum of the declared uncompressed sizes of all members.
    max_total_bytes: int = 256 * 2**30
    # Per deflated member, uncompressed/compressed (zip bombs).
    max_compression_ratio: float = 200.0
    # In UTF-8 bytes.
    max_name_length: int = _DEFAULT_MAX_NAME_LENGTH
    # Only pack's self-check sets this: it replays `ArchiveWriter.snapshot()`,
    # whose end record carries `UNFINISHED_COMMENT` so that nothing else ever
    # accepts an unfinished archive left by a killed pack (no CLI flag sets it).
    accept_unfinished: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"Limits.{field.name} must not be negative")


def _show(name: str) -> str:
    """Quote a member name for a one-line message, escaping anything odd."""
    if len(name) > 80:
        return repr(name[:80]) + "..."
    return repr(name)


def _name_problem(name: object, max_length: int) -> str | None:
    """Say what is wrong with a member name, or None if it is safe."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if len(encoded) > max_length:
        return f"is longer than {max_length} bytes"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if ":" in name:
        return "contains ':' (a drive letter or stream name)"
    if _C0_C1_CONTROLS.search(name):
        return "contains a NUL or control character"
    if not name.isascii() and any(
        unicodedata.category(char) in _DECEPTIVE_CATEGORIES for char in name
    ):
        return "contains an invisible or formatting character"
    parts = name.split("/")
    if ".." in parts:
        return "contains a '..' component"
    if "." in parts:
        return "contains a '.' component"
    if "" in parts:
        return "contains an empty component"
    return None


def is_safe_member_name(name: str, *, max_length: int = _DEFAULT_MAX_NAME_LENGTH) -> bool:
    """Tell whether `name` is acceptable as a member name, on write and on read.

    A safe name is a non-empty, relative, '/'-separated path of at most
    `max_length` UTF-8 bytes with no empty, '.' or '..' components, no
    backslash, no ':' (drive letters, NTFS streams) and no control or
    invisible characters. Such a name cannot escape a folder it is extracted
    into and cannot be displayed as a different name.
    """
    return _name_problem(name, max_length) is None


def _byte_view(buffer: Any, *, writable: bool) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous buffer, without copying."""
    if isinstance(buffer, np.ndarray):
        if buffer.dtype.hasobject:
            raise TypeError("an array of Python objects has no raw bytes to store")
        if not buffer.flags.c_contiguous:
            raise ValueError("the buffer must be C-contiguous")
        if writable and not buffer.flags.writeable:
            raise ValueError("the buffer must be writable")
        # Viewing as uint8 (rather than memoryview(buffer)) also covers dtypes
        # the buffer protocol cannot describe, such as bfloat16.
        return memoryview(buffer.view(np.ndarray).reshape(-1).view(np.uint8))
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("the buffer must be C-contiguous")
    if writable and view.readonly:
        raise ValueError("the buffer must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _crc_pipelined(
    chunks: list[memoryview],
    transfer: Callable[[memoryview], None],
    pool: concurrent.futures.Executor,
    *,
    crc_after_transfer: bool,
) -> int:
    """Move `chunks` with `transfer` while their CRC-32 runs on `pool`.

    Both zlib.crc32 and file I/O release the GIL on large buffers, so they
    genuinely overlap. When writing, a chunk's CRC runs while that same chunk
    is written; when reading (`crc_after_transfer`), a chunk's CRC runs while
    the next chunk is read into memory.
    """
    crc = 0
    pending: concurrent.futures.Future[int] | None = None
    try:
        for chunk in chunks:
            if not crc_after_transfer:
                pending = pool.submit(zlib.crc32, chunk, crc)
                transfer(chunk)
                crc = pending.result()
                pending = None
            else:
                transfer(chunk)
                if pending is not None:
                    crc = pending.result()
                pending = pool.submit(zlib.crc32, chunk, crc)
        if pending is not None:
            crc = pending.result()
            pending = None
    finally:
        # Never return while the helper thread still reads a caller's buffer.
        if pending is not None:
            concurrent.futures.wait([pending])
    return crc


def _chunks(view: memoryview) -> list[memoryview]:
    return [view[start : start + _CHUNK] for start in range(0, len(view), _CHUNK)]


@dataclasses.dataclass(frozen=True)
class _WrittenEntry:
    """What the central directory needs to know about a written member."""

    name: bytes
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int


def _discard_temp(file: Any, temp_path: str | None, pool_box: list[Any]) -> None:
    """Close and delete an unfinished archive; runs at most once per writer."""
    for pool in pool_box:
        pool.shutdown(wait=True)
    try:
        file.close()
    except OSError:
        pass
    if temp_path is None:
        return  # unnamed (O_TMPFILE): closing it freed it
    try:
        os.unlink(temp_path)
    except FileNotFoundError:
        pass


_LINKABLE: dict[int, bool] = {}  # st_dev -> whether an O_TMPFILE file there can be linked


def _can_link_anonymous(folder: str, tmpfile: int) -> bool:
    """Whether an unnamed file in `folder` can later be given a name (tried once per device).

    Some file systems (overlayfs, in containers) create O_TMPFILE files but
    refuse to link them through /proc; a writer there falls back to a name.
    """
    device = os.stat(folder).st_dev
    if device not in _LINKABLE:
        fd = os.open(folder, tmpfile | os.O_RDWR, 0o600)
        probe = os.path.join(folder, f".reprokit-link-probe-{secrets.token_hex(6)}")
        try:
            os.link(f"/proc/{os.getpid()}/fd/{fd}", probe, follow_symlinks=True)
            os.unlink(probe)
            _LINKABLE[device] = True
        except OSError:
            _LINKABLE[device] = False
        finally:
            os.close(fd)
    return _LINKABLE[device]


_sync_file_range: Any = None  # looked up on first use; False where missing


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a finished range of `fd` to disk without waiting (Linux; else nothing)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                _sync_file_range = function
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        # SYNC_FILE_RANGE_WRITE; a failure only loses the head start, fsync still runs.
        _sync_file_range(fd, offset, length, 2)


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable, where the platform supports that."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open folders; its rename is durable enough.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot sync a folder at all; that is not a failure
        # of this archive.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class ArchiveWriter:
    """Writes a zip atomically: a temp file in the target's folder, fsync, os.replace, fsync of the folder.

    Use it as a context manager: leaving the block normally commits, leaving
    it with an exception aborts and leaves any previous file at `path`
    untouched. Member names must pass `is_safe_member_name` and be unique;
    otherwise `ArchiveError` is raised, since the reader would refuse them.

    `zip64_threshold` exists for tests: sizes and offsets at or above it (and
    member counts at or above min(it, 65535)) are written with ZIP64 records.
    """

    def __init__(self, path: str | os.PathLike[str], *, zip64_threshold: int = _MAX32):
        self._path = os.fsdecode(path)
        self._folder, base = os.path.split(os.path.abspath(self._path))
        self._zip64_threshold = min(zip64_threshold, _MAX32)
        self._zip64_count_threshold = min(zip64_threshold, _MAX16)
        flags = (
            os.O_WRONLY
            | os.O_CREAT
            | os.O_EXCL
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_BINARY", 0)
        )
        # SECURITY.md, class 8: where the system allows, the unfinished archive
        # has no name at all (O_TMPFILE) until commit links it in, so a pack
        # killed at any moment (SIGKILL included, even while the self-check
        # replays the snapshot) leaves nothing behind that verify could accept.
        # Elsewhere it is a temp file with an unguessable name, created with
        # O_EXCL|O_NOFOLLOW so that a planted symlink is never followed.
        self._anonymous = False
        fd = self._open_anonymous()
        base_name = f".{base}.tmp-"
        for _ in range(100):
            temp_path = os.path.join(self._folder, base_name + secrets.token_hex(6))
            if fd is not None:
                break  # a name for the link at commit; nothing is created yet
            try:
                # 0o666 (less the umask) gives the archive the permissions any
                # other new file would get; mkstemp would force 0o600.
                fd = os.open(temp_path, flags, 0o666)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(f"cannot create a temporary file next to {self._path}")
        self._temp_path = temp_path
        self._file = open(fd, "wb", buffering=0)
        self._pool_box: list[concurrent.futures.ThreadPoolExecutor] = []
        # Deletes the temp file even if the writer is dropped without
        # commit() or abort(), so no stray ".NAME.tmp-*" files pile up.
        self._finalizer = weakref.finalize(
            self, _discard_temp, self._file, None if self._anonymous else temp_path, self._pool_box
        )
        self._offset = 0
        self._written_back = 0
        self._entries: list[_WrittenEntry] = []
        self._names: set[str] = set()
        self._closed = False
        self._failed = False
        self._snapshot_offset: int | None = None

    def _open_anonymous(self) -> int | None:
        """An unnamed file in the target's folder (Linux O_TMPFILE), or None where unsupported."""
        tmpfile = getattr(os, "O_TMPFILE", None)
        if tmpfile is None or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
            return None
        try:
            if not _can_link_anonymous(self._folder, tmpfile):
                return None
            fd = os.open(self._folder, tmpfile | os.O_RDWR, 0o666)
        except OSError:
            return None  # a file system without O_TMPFILE: a named temp file instead
        self._anonymous = True
        return fd

    def _readable_path(self) -> str:
        """A path any process of this user can open to read the unfinished file."""
        if self._anonymous:
            return f"/proc/{os.getpid()}/fd/{self._file.fileno()}"
        return self._temp_path

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if self._closed:
            return  # committed or aborted explicitly inside the block
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def add_bytes(self, name: str, data: bytes, *, compress: bool = False, level: int = 6) -> None:
        """Add a member holding `data`, deflated (at zlib `level`) when `compress` is true.

        Data that does not shrink, or that shrinks so much that a default
        `Limits` would take it for a zip bomb, is stored instead.
        """
        self._check_open()
        self._rewind_snapshot()
        encoded = self._claim(name)
        view = _byte_view(data, writable=False)
        if compress:
            packer = zlib.compressobj(level, zlib.DEFLATED, -15)
            packed = packer.compress(view) + packer.flush()
            size = len(view)
            looks_like_bomb = size > _RATIO_FLOOR and size > Limits.max_compression_ratio * len(
                packed
            )
            if len(packed) < size and not looks_like_bomb:
                self._guarded(self._write_deflated, encoded, packed, zlib.crc32(view), size)
                return
        self._guarded(self._write_stored, encoded, view)

    def add_buffer(self, name: str, buffer: Any) -> None:
        """Add a stored member holding the bytes of a C-contiguous buffer.

        Accepts numpy arrays (any dtype but object), memoryviews and bytes.
        The data starts at a file offset that is a multiple of `ALIGNMENT`,
        and it is written in chunks straight from `buffer`, without a copy.
        """
        self._check_open()
        self._rewind_snapshot()
        encoded = self._claim(name)
        self._guarded(self._write_stored, encoded, _byte_view(buffer, writable=False))

    def snapshot(self) -> str:
        """Makes the unfinished temp file a complete archive as it stands, and returns its path.

        Lets a caller check the archive (e.g. replay it) before it is moved
        into place; members added afterwards replace the snapshot's directory.
        """
        self._check_open()
        self._rewind_snapshot()
        self._snapshot_offset = self._offset
        self._guarded(self._write_central_directory, UNFINISHED_COMMENT)
        return self._readable_path()

    def _rewind_snapshot(self) -> None:
        if self._snapshot_offset is not None:
            self._file.seek(self._snapshot_offset)
            self._file.truncate()
            self._offset, self._snapshot_offset = self._snapshot_offset, None

    def commit(self) -> None:
        """Finish the archive and move it into place; the writer is then closed."""
        self._check_open()
        self._rewind_snapshot()
        if self._failed:
            self.abort()
            raise ValueError("an earlier write to this archive failed; it was discarded")
        try:
            self._write_central_directory()
            os.fsync(self._file.fileno())
            if self._anonymous:
                # Only now does the archive get a name: complete, and synced.
                os.link(self._readable_path(), self._temp_path, follow_symlinks=True)
            self._file.close()
            os.replace(self._temp_path, self._path)
            self._finalizer.detach()
            self._closed = True
            for pool in self._pool_box:
                pool.shutdown(wait=True)
            _fsync_folder(self._folder)
        except BaseException:
            self.abort()
            if self._anonymous:
                try:
                    os.unlink(self._temp_path)  # linked, but not moved into place
                except OSError:
                    pass
            raise

    def abort(self) -> None:
        """Delete the unfinished archive; a previous file at the target stays."""
        self._closed = True
        self._finalizer()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this archive writer is already committed or aborted")

    def _claim(self, name: str) -> bytes:
        problem = _name_problem(name, _DEFAULT_MAX_NAME_LENGTH)
        if problem is not None:
            raise ArchiveError(f"cannot add member {_show(str(name))}: its name {problem}")
        if name in self._names:
            raise ArchiveError(f"cannot add member {_show(name)}: the archive already has it")
        self._names.add(name)
        return name.encode("utf-8")

    def _guarded(self, write: Callable[..., None], *args: Any) -> None:
        # A write that fails halfway leaves the temp file inconsistent, so
        # remember it and refuse to commit rather than publish a broken zip.
        try:
            write(*args)
        except BaseException:
            self._failed = True
            raise

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if not self._pool_box:
            self._pool_box.append(
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reprokit-crc")
            )
        return self._pool_box[0]

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            written = self._file.write(view)
            view = view[written:]
        self._offset += len(data)
        if self._offset - self._written_back >= _WRITEBACK_STEP:
            start = self._written_back
            _start_writeback(self._file.fileno(), start, self._offset - start)
            self._written_back = self._offset

    def _local_header(
        self, name: bytes, method: int, crc: int, compressed_size: int, size: int, align: bool
    ) -> bytes:
        zip64 = max(size, compressed_size) >= self._zip64_threshold
        extra = b""
        if zip64:
            extra = (
                _EXTRA_HEADER.pack(_EXTRA_ZIP64, 16) + _U64.pack(size) + _U64.pack(compressed_size)
            )
        if align:
            data_offset = self._offset + _LOCAL.size + len(name) + len(extra)
            padding = -data_offset % ALIGNMENT
            if 0 < padding < _ALIGNMENT_RECORD_MIN:
                padding += ALIGNMENT
            if padding:
                extra += _EXTRA_HEADER.pack(_EXTRA_ALIGNMENT, padding - 4)
                extra += _U16.pack(ALIGNMENT) + bytes(padding - _ALIGNMENT_RECORD_MIN)
        # The central record needs ZIP64 for an offset past the threshold too,
        # and both headers must name the same version (one reading of the zip).
        needs_zip64 = zip64 or self._offset >= self._zip64_threshold
        return (
            _LOCAL.pack(
                _SIG_LOCAL,
                _VERSION_ZIP64 if needs_zip64 else _VERSION_DEFAULT,
                _flags(name),
                method,
                _DOS_TIME,
                _DOS_DATE,
                crc,
                _MAX32 if zip64 else compressed_size,
                _MAX32 if zip64 else size,
                len(name),
                len(extra),
            )
            + name
            + extra
        )

    def _write_stored(self, name: bytes, view: memoryview) -> None:
        header_offset = self._offset
        size = len(view)
        if size < _PIPELINE_MIN:
            crc = zlib.crc32(view)
            header = self._local_header(name, _STORED, crc, size, size, align=True)
            if size <= _COALESCE_MAX:
                # One write per tiny member keeps archives of many of them fast.
                self._write_all(header + view)
            else:
                self._write_all(header)
                self._write_all(view)
        else:
            # The CRC is only known once the data is written: write a
            # placeholder, then patch the header's CRC field.
            self._write_all(self._local_header(name, _STORED, 0, size, size, align=True))
            crc = _crc_pipelined(
                _chunks(view), self._write_all, self._pool(), crc_after_transfer=False
            )
            self._file.seek(header_offset + 14)
            self._file.write(_U32.pack(crc))
            self._file.seek(self._offset)
        self._entries.append(
            _WrittenEntry(name, _flags(name), _STORED, crc, size, size, header_offset)
        )

    def _write_deflated(self, name: bytes, packed: bytes, crc: int, size: int) -> None:
        header_offset = self._offset
        header = self._local_header(name, _DEFLATED, crc, len(packed), size, align=False)
        self._write_all(header + packed)
        self._entries.append(
            _WrittenEntry(name, _flags(name), _DEFLATED, crc, len(packed), size, header_offset)
        )

    def _central_record(self, entry: _WrittenEntry) -> bytes:
        limit = self._zip64_threshold
        fields = [entry.size, entry.compressed_size, entry.header_offset]
        overflow = [value for value in fields if value >= limit]
        extra = b""
        if overflow:
            extra = _EXTRA_HEADER.pack(_EXTRA_ZIP64, 8 * len(overflow))
            extra += b"".join(_U64.pack(value) for value in overflow)
        size, compressed_size, header_offset = (
            _MAX32 if value >= limit else value for value in fields
        )
        return (
            _CENTRAL.pack(
                _SIG_CENTRAL,
                _VERSION_MADE_BY,
                _VERSION_ZIP64 if overflow else _VERSION_DEFAULT,
                entry.flags,
                entry.method,
                _DOS_TIME,
                _DOS_DATE,
                entry.crc,
                compressed_size,
                size,
                len(entry.name),
                len(extra),
                0,
                0,
                0,
                _REGULAR_FILE_ATTR,
                header_offset,
            )
            + entry.name
            + extra
        )

    def _write_central_directory(self, comment: bytes = b"") -> None:
        cd_offset = self._offset
        self._write_all(b"".join(self._central_record(entry) for entry in self._entries))
        cd_size = self._offset - cd_offset
        count = len(self._entries)
        count_overflows = count >= self._zip64_count_threshold
        size_overflows = cd_size >= self._zip64_threshold
        offset_overflows = cd_offset >= self._zip64_threshold
        if count_overflows or size_overflows or offset_overflows:
            eocd64_offset = self._offset
            self._write_all(
                _EOCD64.pack(
                    _SIG_EOCD64,
                    _EOCD64.size - 12,
                    _VERSION_MADE_BY,
                    _VERSION_ZIP64,
                    0,
                    0,
                    count,
                    count,
                    cd_size,
                    cd_offset,
                )
                + _LOCATOR64.pack(_SIG_LOCATOR64, 0, eocd64_offset, 1)
            )
        short_count = _MAX16 if count_overflows else count
        self._write_all(
            _EOCD.pack(
                _SIG_EOCD,
                0,
                0,
                short_count,
                short_count,
                _MAX32 if size_overflows else cd_size,
                _MAX32 if offset_overflows else cd_offset,
                len(comment),
            )
            + comment
        )


def _flags(name: bytes) -> int:
    return 0 if name.isascii() else _FLAG_UTF8


class _Member(NamedTuple):
    """A validated member: where its data is and what it must look like.

    A tuple rather than a dataclass: an archive of 100,000 arrays makes
    100,000 of them at open, and a tuple is built in C from its columns.
    """

    name: str
    raw_name: bytes
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int = -1
    # Fields the local header must repeat exactly (one reading of the zip).
    needed: int = 0
    time: int = 0
    date: int = 0


# `_Table.columns` holds a row per integer field of `_Member`, in its order.
_FIELDS = _Member._fields[2:]
_METHOD, _CRC, _SIZE, _DATA_OFFSET = (
    _FIELDS.index(field) for field in ("method", "crc", "size", "data_offset")
)


class _Table:
    """The members of an opened archive, a numpy column per field (directory order).

    An archive of 100,000 arrays made 100,000 `_Member` objects at open and
    looked each one up twice more to read them; columns are built at once,
    and batch reads take what they need from them with numpy.
    """

    __slots__ = ("columns", "index", "names", "raw_names", "sizes")

    def __init__(self, names: list[str], raw_names: list[bytes] | None, columns: np.ndarray):
        self.names = names
        # None: the names are ASCII, each its own raw name (the plain path).
        self.raw_names = raw_names
        self.index = dict(zip(names, itertools.count()))
        # int64, or object where a ZIP64 value does not fit (then batch
        # reads go member by member: see `ArchiveReader._columns`).
        self.columns = columns
        # As a list too: `open_archive` asks the size of every array by name.
        self.sizes: list[int] = columns[_SIZE].tolist()

    @classmethod
    def of(cls, members: dict[str, _Member]) -> _Table:
        values = list(members.values())
        rows = [[member[field] for member in values] for field in range(2, len(_Member._fields))]
        try:
            columns = np.array(rows, dtype=np.int64).reshape(len(_FIELDS), len(values))
        except OverflowError:
            columns = np.array(rows, dtype=object).reshape(len(_FIELDS), len(values))
        return cls(list(members), [member.raw_name for member in values], columns)

    def member(self, position: int) -> _Member:
        name = self.names[position]
        raw_name = name.encode("ascii") if self.raw_names is None else self.raw_names[position]
        return _Member(name, raw_name, *self.columns[:, position].tolist())


class ArchiveReader:
    """Opens an untrusted archive and validates all of its structure before any member is used.

    Opening parses the end records, the whole central directory and every
    local header, and raises `ArchiveError` for anything unsafe or
    inconsistent. Reading a member then verifies its size and CRC-32.
    """

    def __init__(self, path: str | os.PathLike[str], limits: Limits | None = None):
        self._path = os.fsdecode(path)
        self._limits = limits if limits is not None else Limits()
        self._lock = threading.Lock()
        self._pool_box: list[concurrent.futures.ThreadPoolExecutor] = []
        try:
            self._file = open(self._path, "rb", buffering=0)
        except OSError as exc:
            raise ArchiveError(f"cannot open archive {self._path}: {exc.strerror or exc}") from exc
        try:
            self._table = self._load()
        except ArchiveError:
            self.close()
            raise
        except (OSError, ValueError, struct.error, IndexError, OverflowError) as exc:
            # A safety net: every expected problem has its own message above.
            self.close()
            raise ArchiveError(f"archive is corrupted or unreadable: {exc}") from exc
        self.names: list[str] = list(self._table.names)

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._table.index

    def close(self) -> None:
        """Release the file; further reads fail."""
        for pool in self._pool_box:
            pool.shutdown(wait=True)
        self._pool_box.clear()
        self._file.close()

    def size(self, name: str) -> int:
        """The uncompressed size of member `name` in bytes."""
        return self._table.sizes[self._position(name)]

    def sizes(self, names: list[str]) -> list[int | None]:
        """The uncompressed size of each member in `names`, None for a name not in the archive.

        One call for the 100,000 arrays `open_archive` checks, instead of a
        lookup and a method call each.
        """
        if self._file.closed:
            raise ValueError("this archive is closed")
        index, sizes = self._table.index, self._table.sizes
        return [None if (i := index.get(name)) is None else sizes[i] for name in names]

    def read_bytes(self, name: str) -> bytes:
        """Read a whole (small) member into memory, verifying its size and CRC.

        Refuses members declaring more than `Limits.max_small_member_bytes`.
        Deflated members are inflated with a bounded decompressor that never
        produces more than the declared size (plus one byte to notice a lie).
        """
        member = self._member(name)
        limit = self._limits.max_small_member_bytes
        if member.size > limit:
            raise ArchiveError(
                f"member {_show(name)} is too large to read into memory "
                f"({member.size} bytes; the limit is {limit})"
            )
        if member.method == _STORED:
            data = self._read_range(member, member.data_offset, member.size)
        else:
            data = self._inflate(member)
        if zlib.crc32(data) != member.crc:
            raise ArchiveError(f"member {_show(name)} is corrupted (CRC mismatch)")
        return data

    def read_into(self, name: str, out: Any) -> None:
        """Read a stored member into `out`, a writable buffer of exactly its size.

        The data goes straight from the file into `out`; its CRC-32 is then
        checked. On error the contents of `out` are undefined.
        """
        member = self._member(name)
        if member.method != _STORED:
            raise ArchiveError(f"member {_show(name)} is compressed, but array data must be stored")
        view = _byte_view(out, writable=True)
        if len(view) != member.size:
            raise ArchiveError(
                f"member {_show(name)} holds {member.size} bytes, "
                f"but the buffer for it has {len(view)}"
            )
        with self._lock:
            self._seek(member, member.data_offset)

            def fill(chunk: memoryview) -> None:
                self._readinto_exact(member, chunk)

            if member.size < _PIPELINE_MIN:
                fill(view)
                crc = zlib.crc32(view)
            else:
                crc = _crc_pipelined(_chunks(view), fill, self._pool(), crc_after_transfer=True)
        if crc != member.crc:
            raise ArchiveError(f"member {_show(name)} is corrupted (CRC mismatch)")

    def verify_member(self, name: str) -> None:
        """Check a member's size and CRC-32 without keeping it: stored data is streamed
        through one chunk-sized buffer, so verifying a huge array costs no memory."""
        member = self._member(name)
        if member.method != _STORED:
            # Inflated chunk by chunk and dropped: `verify` accepts every deflated
            # array `run` can read, however large (SECURITY.md, class 10).
            crc = 0

            def check(chunk: bytes) -> None:
                nonlocal crc
                crc = zlib.crc32(chunk, crc)

            self._inflate_into(member, check)
            if crc != member.crc:
                raise ArchiveError(f"member {_show(name)} is corrupted (CRC mismatch)")
            return
        buffer = memoryview(bytearray(min(_CHUNK, member.size)))
        crc = 0
        with self._lock:
            self._seek(member, member.data_offset)
            remaining = member.size
            while remaining:
                part = buffer[: min(len(buffer), remaining)]
                self._readinto_exact(member, part)
                crc = zlib.crc32(part, crc)
                remaining -= len(part)
        if crc != member.crc:
            raise ArchiveError(f"member {_show(name)} is corrupted (CRC mismatch)")

    def read_aligned(self, name: str) -> np.ndarray:
        """Read a member into a new uint8 array whose data is `ALIGNMENT`-aligned.

        Stored members go straight from the file into the array; deflated
        ones are inflated (bounded by their declared size) and copied.
        """
        member = self._member(name)
        size = member.size
        backing = np.empty(size + ALIGNMENT, dtype=np.uint8)
        start = -backing.ctypes.data % ALIGNMENT
        # Not backing[start:...]: numpy moves an empty slice's pointer back to
        # the base, and callers may check alignment even for empty members.
        array = np.ndarray((size,), np.uint8, buffer=backing, offset=start)
        if member.method == _STORED:
            self.read_into(name, array)
            return array
        # Deflated arrays exist only in archives fitted under a size limit.
        data = self._inflate(member)
        if zlib.crc32(data) != member.crc:
            raise ArchiveError(f"member {_show(name)} is corrupted (CRC mismatch)")
        array[:] = np.frombuffer(data, dtype=np.uint8)
        return array

    def verify_members(self, names: list[str]) -> None:
        """`verify_member` for each of `names`; small stored members are read in batches."""
        positions = self._positions(names)
        if positions is None:
            self._verify_members_each(names)
            return
        columns = self._table.columns
        sizes = columns[_SIZE, positions]
        small = (columns[_METHOD, positions] == _STORED) & (sizes <= _COALESCE_MAX)
        # The same batches, in the same order among the large members' checks,
        # as `_verify_members_each` (so the same member is reported first): a
        # batch ends at the small member that brings it to _CHUNK bytes.
        filled = np.cumsum(np.where(small, sizes, 0))
        steps = [(int(position), False) for position in np.flatnonzero(~small)]
        base = 0
        while (end := int(np.searchsorted(filled, base + _CHUNK))) < len(filled):
            steps.append((end, True))
            base = int(filled[end])
        steps.sort()
        small_positions = np.flatnonzero(small)
        taken = 0
        for step, flush in steps:
            if flush:
                upto = int(np.searchsorted(small_positions, step, side="right"))
                self._read_small(positions[small_positions[taken:upto]], keep=False)
                taken = upto
            else:
                self.verify_member(names[step])
        if taken < len(small_positions):
            self._read_small(positions[small_positions[taken:]], keep=False)

    def _verify_members_each(self, names: list[str]) -> None:
        batch: list[str] = []
        batch_bytes = 0
        for name in names:
            member = self._member(name)
            if member.method == _STORED and member.size <= _COALESCE_MAX:
                batch.append(name)
                batch_bytes += member.size
                if batch_bytes >= _CHUNK:  # what a batch holds in memory at once
                    self.read_small_members(batch)
                    batch, batch_bytes = [], 0
            else:
                self.verify_member(name)
        if batch:
            self.read_small_members(batch)

    def read_small_members(self, names: list[str]) -> list[bytes | memoryview]:
        """The bytes of small stored members, in the order of `names`, each CRC-checked.

        Members that lie close together in the file are fetched with one read
        (spans up to `_CHUNK`), so reading 100,000 tiny arrays costs a few
        dozen reads instead of 100,000 (`inspect`'s statistics). Deflated or
        large members are read one by one. Each item is a read-only buffer
        (`bytes`, or a `memoryview`): a bytes slice costs a fifth of a
        memoryview of the span, and does not keep the whole span alive.
        """
        positions = self._positions(names)
        if positions is None:
            return self._read_small_members_each(names)
        return self._read_small(positions)

    def _read_small(self, positions: np.ndarray, *, keep: bool = True) -> list[bytes | memoryview]:
        """`read_small_members` for the members at `positions` of the table.

        The same spans, checks and messages as `_read_small_members_each`,
        with the per-member work (slicing, CRC-32, comparing) done in C.
        Without `keep` (verifying), nothing is returned.
        """
        table = self._table
        columns = table.columns[:, positions]
        order = np.argsort(columns[_DATA_OFFSET], kind="stable")
        offsets = columns[_DATA_OFFSET, order]
        sizes = columns[_SIZE, order]
        crcs = columns[_CRC, order]
        ends = offsets + sizes
        unstored = np.flatnonzero(columns[_METHOD, order] != _STORED).tolist()
        unstored.append(len(order))
        order_list = order.tolist()
        in_order = bool((order == np.arange(len(order))).all())
        out: list[bytes | memoryview | None] = [] if in_order else [None] * len(order)
        start = 0
        next_unstored = 0
        while start < len(order):
            while unstored[next_unstored] <= start:
                next_unstored += 1
            first_offset = int(offsets[start])
            if unstored[next_unstored] == start or sizes[start] > _CHUNK:
                # Deflated or large: alone, as `read_aligned` reads it.
                view = memoryview(self.read_aligned(table.names[positions[order_list[start]]]))
                if in_order:
                    out.append(view)
                else:
                    out[order_list[start]] = view
                start += 1
                continue
            # The run of stored members from `start`, while the span stays
            # within _CHUNK (their data do not overlap, so their ends ascend).
            run_end = unstored[next_unstored]
            end = (
                start
                + 1
                + int(
                    np.searchsorted(ends[start + 1 : run_end], first_offset + _CHUNK, side="right")
                )
            )
            length = int(ends[end - 1]) - first_offset
            span = self._pread(first_offset, length)
            starts = (offsets[start:end] - first_offset).tolist()
            views: list[bytes | memoryview] = [
                span[at : at + size]
                for at, size in zip(starts, sizes[start:end].tolist(), strict=True)
            ]
            expected = crcs[start:end].tolist()
            if len(span) != length or list(map(zlib.crc32, views)) != expected:
                # Find the first bad member, in the order the member-by-member loop checks.
                for index, data in enumerate(views):
                    shown = _show(table.names[positions[order_list[start + index]]])
                    if len(data) != sizes[start + index]:
                        raise ArchiveError(f"member {shown} is cut short")
                    if zlib.crc32(data) != expected[index]:
                        raise ArchiveError(f"member {shown} is corrupted (CRC mismatch)")
            if keep and in_order:
                out.extend(views)
            elif keep:
                for index, view in zip(order_list[start:end], views, strict=True):
                    out[index] = view
            start = end
        return out  # type: ignore[return-value]

    def _read_small_members_each(self, names: list[str]) -> list[bytes | memoryview]:
        members = [self._member(name) for name in names]
        out: list[memoryview | None] = [None] * len(members)
        order = sorted(range(len(members)), key=lambda i: members[i].data_offset)
        start = 0
        while start < len(order):
            first = members[order[start]]
            end = start + 1
            if first.method == _STORED and first.size <= _CHUNK:
                while end < len(order):
                    member = members[order[end]]
                    if (
                        member.method != _STORED
                        or member.data_offset + member.size - first.data_offset > _CHUNK
                    ):
                        break
                    end += 1
                last = members[order[end - 1]]
                span = memoryview(
                    self._pread(first.data_offset, last.data_offset + last.size - first.data_offset)
                )
                for position in order[start:end]:
                    member = members[position]
                    offset = member.data_offset - first.data_offset
                    data = span[offset : offset + member.size]
                    if len(data) != member.size:
                        raise ArchiveError(f"member {_show(member.name)} is cut short")
                    if zlib.crc32(data) != member.crc:
                        raise ArchiveError(
                            f"member {_show(member.name)} is corrupted (CRC mismatch)"
                        )
                    out[position] = data
            else:
                out[order[start]] = memoryview(self.read_aligned(first.name))
            start = end
        return out  # type: ignore[return-value]

    def sha256(self) -> str:
        """The SHA-256 of the whole archive file, as hex, read in chunks."""
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(2**20))
        try:
            with self._lock:
                self._file.seek(0)
                while count := self._file.readinto(buffer):
                    digest.update(buffer[:count])
        except OSError as exc:
            raise ArchiveError(f"cannot read archive: {exc.strerror or exc}") from exc
        return digest.hexdigest()

    # -- reading helpers ---------------------------------------------------

    def _member(self, name: str) -> _Member:
        return self._table.member(self._position(name))

    def _position(self, name: str) -> int:
        if self._file.closed:
            raise ValueError("this archive is closed")
        try:
            return self._table.index[name]
        except KeyError:
            raise ArchiveError(f"archive has no member {_show(str(name))}") from None

    def _positions(self, names: list[str]) -> np.ndarray | None:
        """Where `names` are in the table, for batch reads; None where those cannot
        be used (a closed archive, an unknown name, ZIP64 values past int64), so
        that the member-by-member reads fail, or succeed, as they always did."""
        table = self._table
        if self._file.closed or table.columns.dtype != np.int64:
            return None
        try:
            return np.fromiter(map(table.index.__getitem__, names), np.intp, len(names))
        except (KeyError, TypeError):
            return None

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if not self._pool_box:
            self._pool_box.append(
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reprokit-crc")
            )
        return self._pool_box[0]

    def _seek(self, member: _Member, offset: int) -> None:
        try:
            self._file.seek(offset)
        except OSError as exc:
            raise ArchiveError(
                f"cannot read member {_show(member.name)}: {exc.strerror or exc}"
            ) from exc

    def _readinto_exact(self, member: _Member, view: memoryview) -> None:
        try:
            while len(view):
                count = self._file.readinto(view)
                if not count:
                    raise ArchiveError(
                        f"member {_show(member.name)} is truncated (the archive ends early)"
                    )
                view = view[count:]
        except OSError as exc:
            raise ArchiveError(
                f"cannot read member {_show(member.name)}: {exc.strerror or exc}"
            ) from exc

    def _read_range(self, member: _Member, offset: int, length: int) -> bytes:
        parts = []
        missing = length
        try:
            with self._lock:
                self._seek(member, offset)
                # FileIO.read fills a new bytes object directly: no extra copy
                # unless the system returns a short read.
                while missing:
                    part = self._file.read(missing)
                    if not part:
                        raise ArchiveError(
                            f"member {_show(member.name)} is truncated (the archive ends early)"
                        )
                    parts.append(part)
                    missing -= len(part)
        except OSError as exc:
            raise ArchiveError(
                f"cannot read member {_show(member.name)}: {exc.strerror or exc}"
            ) from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _inflate(self, member: _Member) -> bytes:
        output = bytearray()
        self._inflate_into(member, output.extend)
        return bytes(output)

    def _inflate_into(self, member: _Member, sink: Callable[[bytes], None]) -> None:
        """Inflate a member, handing its output to `sink` in pieces of at most `_CHUNK` bytes.

        Never produces more than the declared size (plus one byte to notice
        a lie), so a bomb is stopped however it is consumed.
        """
        shown = _show(member.name)
        inflater = zlib.decompressobj(-15)
        produced = 0
        consumed = 0
        try:
            while consumed < member.compressed_size and not inflater.eof:
                length = min(_CHUNK, member.compressed_size - consumed)
                pending = self._read_range(member, member.data_offset + consumed, length)
                consumed += length
                while not inflater.eof:
                    # Ask for one byte more than declared, to notice a lie
                    # without ever holding more than that.
                    piece = inflater.decompress(pending, min(_CHUNK, member.size - produced + 1))
                    pending = inflater.unconsumed_tail
                    if not piece and not pending:
                        break  # needs the next compressed chunk
                    produced += len(piece)
                    if produced > member.size:
                        raise ArchiveError(
                            f"member {shown} is corrupted (it inflates beyond its declared size)"
                        )
                    sink(piece)
        except zlib.error as exc:
            raise ArchiveError(f"member {shown} is corrupted (invalid deflate data)") from exc
        if not inflater.eof:
            raise ArchiveError(f"member {shown} is corrupted (its deflate data is cut short)")
        if consumed < member.compressed_size or inflater.unused_data:
            raise ArchiveError(f"member {shown} is corrupted (data after its deflate stream)")
        if produced != member.size:
            raise ArchiveError(
                f"member {shown} is corrupted (size mismatch: {produced} bytes, "
                f"{member.size} declared)"
            )

    # -- validation at open ------------------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes at `offset`, or fewer at end of file."""
        with self._lock:
            self._file.seek(offset)
            data = self._file.read(length) or b""
            while len(data) < length:
                more = self._file.read(length - len(data))
                if not more:
                    break
                data += more
        return data

    def _load(self) -> _Table:
        file_size = os.fstat(self._file.fileno()).st_size
        if file_size == 0:
            raise ArchiveError("archive is empty (0 bytes)")
        count, cd_offset, cd_size = self._find_central_directory(file_size)
        limits = self._limits
        if count == 0:
            raise ArchiveError("archive is empty (it has no members)")
        if count > limits.max_members:
            raise ArchiveError(
                f"archive has {count} members; the limit is {limits.max_members} "
                f"(raise it only for an archive you trust)"
            )
        entry_max = _CENTRAL.size + 4 * limits.max_name_length + 2 * _MAX_ENTRY_EXTRA
        if not count * _CENTRAL.size <= cd_size <= count * entry_max:
            raise ArchiveError(
                "archive is corrupted (its central directory size does not fit its member count)"
            )
        directory = self._pread(cd_offset, cd_size)
        if len(directory) != cd_size:
            raise ArchiveError("archive is truncated (central directory cut short)")
        try:
            table = _plain_members(
                directory, count, cd_offset, self._limits, self._pread, self._file
            )
        except (OSError, ValueError, IndexError, OverflowError):
            table = None  # not shown plain: the entry-by-entry checks say what is wrong
        if table is not None:
            return table
        members = self._parse_central_directory(directory, count)
        return _Table.of(self._check_local_headers(members, cd_offset))

    def _find_central_directory(self, file_size: int) -> tuple[int, int, int]:
        """Locate the central directory through the (ZIP64) end records."""
        tail_start = max(0, file_size - _EOCD.size - _MAX16)
        tail = self._pread(tail_start, file_size - tail_start)
        signature = _U32.pack(_SIG_EOCD)
        position = tail.rfind(signature)
        # The real record is the one whose comment ends exactly at end of
        # file; a signature-like byte run inside a comment is skipped.
        while position >= 0:
            if position + _EOCD.size <= len(tail):
                comment_length = _U16.unpack_from(tail, position + 20)[0]
                if position + _EOCD.size + comment_length == len(tail):
                    break
            position = tail.rfind(signature, 0, position)
        if position < 0:
            head = self._pread(0, 4)
            if head in (_U32.pack(_SIG_LOCAL), signature):
                raise ArchiveError(
                    "archive is truncated or corrupted (no end of central directory record)"
                )
            raise ArchiveError("not a zip archive")
        eocd_offset = tail_start + position
        (_, disk, cd_disk, disk_count, count, cd_size, cd_offset, comment_length) = (
            _EOCD.unpack_from(tail, position)
        )
        # One reading of the file (SECURITY.md, class 1): zipfile, unzip and
        # this reader all find the end record by scanning from the end, so a
        # comment, or a signature inside the end record itself, can hand
        # each of them a different directory.
        earlier = tail.rfind(signature, 0, position)
        while earlier >= 0 and not comment_length:
            # An end record whose comment runs to the end of the file, holding
            # this one: readers that take the first record see another archive.
            if earlier + _EOCD.size <= len(tail):
                if earlier + _EOCD.size + _U16.unpack_from(tail, earlier + 20)[0] == len(tail):
                    comment_length = len(tail) - earlier - _EOCD.size
            earlier = tail.rfind(signature, 0, earlier)
        comment = tail[position + _EOCD.size :]
        if comment == UNFINISHED_COMMENT and self._limits.accept_unfinished:
            comment_length = 0  # pack's self-check, replaying its own snapshot
        elif comment == UNFINISHED_COMMENT:
            raise ArchiveError(
                "archive is unfinished: a snapshot that a pack left behind when it was "
                "stopped; pack again"
            )
        if comment_length:
            raise ArchiveError(
                "archive has a comment after its end record, which reprokit never writes "
                "(it can hide a second directory that other zip readers would use)"
            )
        if tail.find(signature, position + 1) >= 0:
            raise ArchiveError(
                "archive's end record holds a second end-record signature "
                "(zip readers could disagree on where the archive ends)"
            )

        overflowed = _MAX16 in (disk, cd_disk, disk_count, count) or _MAX32 in (cd_size, cd_offset)
        locator_offset = eocd_offset - _LOCATOR64.size
        locator = self._pread(locator_offset, _LOCATOR64.size) if locator_offset >= 0 else b""
        has_locator = (
            len(locator) == _LOCATOR64.size and _U32.unpack_from(locator)[0] == _SIG_LOCATOR64
        )
        cd_end = eocd_offset
        # zipfile (and unzip) take a locator signature right before the end
        # record as a ZIP64 locator whatever the classic fields say, so a
        # locator is always followed here too: the last bytes of a directory
        # cannot pose as one for some readers and not for others.
        if overflowed or has_locator:
            if not has_locator:
                raise ArchiveError("archive is truncated or corrupted (ZIP64 locator missing)")
            _, locator_disk, eocd64_offset, total_disks = _LOCATOR64.unpack(locator)
            if locator_disk != 0 or total_disks > 1:
                raise ArchiveError("archive spans multiple disks, which is not supported")
            if eocd64_offset + _EOCD64.size > locator_offset:
                raise ArchiveError("archive is corrupted (ZIP64 end record out of place)")
            record = self._pread(eocd64_offset, _EOCD64.size)
            (
                sig,
                record_size,
                _,
                _,
                disk64,
                cd_disk64,
                disk_count64,
                count64,
                cd_size64,
                cd_offset64,
            ) = _EOCD64.unpack(record)
            if (
                sig != _SIG_EOCD64
                or record_size != _EOCD64.size - 12
                or eocd64_offset + 12 + record_size != locator_offset
            ):
                raise ArchiveError("archive is corrupted (bad ZIP64 end record)")
            pairs = [
                (disk, disk64, _MAX16),
                (cd_disk, cd_disk64, _MAX16),
                (disk_count, disk_count64, _MAX16),
                (count, count64, _MAX16),
                (cd_size, cd_size64, _MAX32),
                (cd_offset, cd_offset64, _MAX32),
            ]
            # A field that did not overflow must agree with its ZIP64 copy,
            # or two tools could see two different archives.
            if any(short not in (full, limit) for short, full, limit in pairs):
                raise ArchiveError("archive is corrupted (end records disagree)")
            disk, cd_disk, disk_count, count = disk64, cd_disk64, disk_count64, count64
            cd_size, cd_offset = cd_size64, cd_offset64
            cd_end = eocd64_offset
        if disk != 0 or cd_disk != 0 or disk_count != count:
            raise ArchiveError("archive spans multiple disks, which is not supported")
        if cd_offset + cd_size != cd_end:
            # Also refuses data prepended to the archive (self-extractors):
            # offsets in a reprokit archive are always absolute.
            raise ArchiveError(
                "archive is truncated or corrupted (central directory not where the end record says)"
            )
        return count, cd_offset, cd_size

    def _parse_central_directory(self, directory: bytes, count: int) -> dict[str, _Member]:
        limits = self._limits
        members: dict[str, _Member] = {}
        total = 0
        position = 0
        for index in range(count):
            if position + _CENTRAL.size > len(directory):
                raise ArchiveError("archive is corrupted (central directory cut short)")
            (
                signature,
                _made_by,
                needed,
                flags,
                method,
                time,
                date,
                crc,
                compressed_size,
                size,
                name_length,
                extra_length,
                comment_length,
                disk,
                internal,
                external,
                header_offset,
            ) = _CENTRAL.unpack_from(directory, position)
            if signature != _SIG_CENTRAL:
                raise ArchiveError(
                    f"archive is corrupted (central directory entry {index} has a bad signature)"
                )
            name_start = position + _CENTRAL.size
            extra_start = name_start + name_length
            position = extra_start + extra_length + comment_length
            if position > len(directory):
                raise ArchiveError(
                    f"archive is corrupted (central directory entry {index} is cut short)"
                )
            if extra_length > _MAX_ENTRY_EXTRA or comment_length > _MAX_ENTRY_EXTRA:
                raise ArchiveError(
                    f"central directory entry {index} has an oversized extra field or comment"
                )
            raw_name = directory[name_start:extra_start]
            name = _decode_name(raw_name, flags, index)
            shown = _show(name)

            mode = external >> 16
            if name.endswith("/") or external & _MSDOS_DIRECTORY_ATTR or stat.S_ISDIR(mode):
                raise ArchiveError(
                    f"member {shown} is a directory entry; archives may only hold files"
                )
            problem = _name_problem(name, limits.max_name_length)
            if problem is not None:
                raise ArchiveError(f"member {shown} has an unsafe name: it {problem}")
            if name in members:
                raise ArchiveError(f"member {shown} appears more than once")
            file_type = stat.S_IFMT(mode)
            if file_type and file_type != stat.S_IFREG:
                kind = _FILE_TYPES.get(file_type, "not a regular file")
                raise ArchiveError(f"member {shown} is {kind}; archives may only hold files")
            if flags & _ANY_ENCRYPTION:
                raise ArchiveError(f"member {shown} is encrypted, which is not supported")
            if method not in (_STORED, _DEFLATED):
                raise ArchiveError(
                    f"member {shown} uses compression method {method}; "
                    f"only stored (0) and deflate (8) are supported"
                )
            _check_canonical_entry(shown, raw_name, flags, comment_length, internal, mode)

            extras = _parse_extra(
                directory[extra_start : extra_start + extra_length], shown, _CENTRAL_EXTRAS
            )
            size, compressed_size, header_offset, disk = _apply_zip64(
                extras.get(_EXTRA_ZIP64), size, compressed_size, header_offset, disk, shown
            )
            if disk != 0:
                raise ArchiveError("archive spans multiple disks, which is not supported")
            if method == _STORED and compressed_size != size:
                raise ArchiveError(
                    f"member {shown} is corrupted (stored, but its two sizes differ)"
                )
            if (
                method == _DEFLATED
                and size > _RATIO_FLOOR
                and size > limits.max_compression_ratio * max(compressed_size, 1)
            ):
                raise ArchiveError(
                    f"member {shown} has a compression ratio over "
                    f"{limits.max_compression_ratio:g} (a likely zip bomb)"
                )
            total += size
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    f"archive declares more than {limits.max_total_bytes} bytes of member data "
                    f"(the limit; raise it only for an archive you trust)"
                )
            members[name] = _Member(
                name,
                raw_name,
                method,
                flags,
                crc,
                compressed_size,
                size,
                header_offset,
                needed=needed,
                time=time,
                date=date,
            )
        if position != len(directory):
            raise ArchiveError(
                "archive is corrupted (central directory has data after its last entry)"
            )
        return members

    def _check_local_headers(
        self, members: dict[str, _Member], cd_offset: int
    ) -> dict[str, _Member]:
        """Check each local header against the central directory, and data ranges."""
        checked: dict[str, _Member] = {}
        previous_end = 0
        previous: _Member | None = None
        ordered = sorted(members.values(), key=lambda m: m.header_offset)
        # Headers that lie close together are read with one read (an archive of
        # 100,000 small arrays made 100,000 reads here); a header followed by a
        # large member's data is read alone, so no data is read with it.
        windows: list[tuple[int, int]] = []
        window_of: list[int] = []
        for member in ordered:
            end = min(member.header_offset + _LOCAL.size + len(member.raw_name) + 256, cd_offset)
            if windows and end - windows[-1][0] <= _HEADER_WINDOW:
                windows[-1] = (windows[-1][0], max(windows[-1][1], end))
            else:
                windows.append((member.header_offset, end))
            window_of.append(len(windows) - 1)
        try:
            # Ask for every header at once: from a cold cache, reading them one
            # by one cost 15 ms for 213 members (benchmarks/), this 3.5 ms.
            for start, end in windows:
                if start < end:  # else refused below
                    os.posix_fadvise(
                        self._file.fileno(), start, end - start, os.POSIX_FADV_WILLNEED
                    )
        except (AttributeError, OSError):
            pass  # no posix_fadvise here (macOS, Windows): only slower
        current, window_start, window = -1, 0, b""
        for position, member in enumerate(ordered):
            shown = _show(member.name)
            header_length = _LOCAL.size + len(member.raw_name)
            if member.header_offset + header_length > cd_offset:
                raise ArchiveError(
                    f"member {shown} is corrupted (its local header lies outside the data area)"
                )
            if member.header_offset < previous_end:
                assert previous is not None
                raise ArchiveError(
                    f"member {shown} overlaps member {_show(previous.name)} "
                    f"(a likely zip bomb or tampering)"
                )
            if member.header_offset != previous_end:
                # Bytes no member owns are invisible to every reader, and a
                # place to hide a second archive (SECURITY.md, class 1).
                where = (
                    "before the first member (prepended data)"
                    if previous is None
                    else f"between member {_show(previous.name)} and member {shown}"
                )
                raise ArchiveError(
                    f"archive has {member.header_offset - previous_end} bytes {where} "
                    f"that belong to no member"
                )
            # The header, its name and (usually) its extra field in one read.
            length = min(header_length + 256, cd_offset - member.header_offset)
            if window_of[position] != current:
                current = window_of[position]
                window_start, window_end = windows[current]
                window = self._pread(window_start, window_end - window_start)
            relative = member.header_offset - window_start
            header = window[relative : relative + length]
            if len(header) < header_length:
                raise ArchiveError(f"member {shown} is truncated (local header cut short)")
            (
                signature,
                needed,
                flags,
                method,
                time,
                date,
                crc,
                compressed_size,
                size,
                name_length,
                extra_length,
            ) = _LOCAL.unpack_from(header)
            if signature != _SIG_LOCAL:
                raise ArchiveError(f"member {shown} is corrupted (bad local header signature)")
            if (
                name_length != len(member.raw_name)
                or header[_LOCAL.size : header_length] != member.raw_name
            ):
                raise ArchiveError(
                    f"member {shown} is corrupted (its local header names another file)"
                )
            if flags & _ANY_ENCRYPTION:
                raise ArchiveError(f"member {shown} is encrypted, which is not supported")
            if method != member.method:
                raise ArchiveError(
                    f"member {shown} is corrupted (local header and central directory "
                    f"disagree on compression)"
                )
            if header_length + extra_length > cd_offset - member.header_offset:
                raise ArchiveError(
                    f"member {shown} is corrupted (its local header lies outside the data area)"
                )
            extra = header[header_length : header_length + extra_length]
            if len(extra) < extra_length:
                extra = self._pread(member.header_offset + header_length, extra_length)
            extras = _parse_extra(extra, shown, _LOCAL_EXTRAS)
            _check_alignment_record(extras.get(_EXTRA_ALIGNMENT), shown)
            zip64 = extras.get(_EXTRA_ZIP64)
            if zip64 is not None:
                if (compressed_size, size) != (_MAX32, _MAX32) or len(zip64) != 16:
                    raise ArchiveError(
                        f"member {shown} is corrupted (malformed ZIP64 field in its local header)"
                    )
                size, compressed_size = struct.unpack("<QQ", zip64)
            if (needed, flags, time, date, crc, compressed_size, size) != (
                member.needed,
                member.flags,
                member.time,
                member.date,
                member.crc,
                member.compressed_size,
                member.size,
            ):
                raise ArchiveError(
                    f"member {shown} is corrupted (local header and central directory "
                    f"disagree on its size, CRC, flags, version or time)"
                )
            data_offset = member.header_offset + header_length + extra_length
            data_end = data_offset + member.compressed_size
            if data_end > cd_offset:
                raise ArchiveError(
                    f"member {shown} is corrupted or truncated (its data runs past the data area)"
                )
            # Not dataclasses.replace: that costs more than every check above.
            checked[member.name] = _Member(
                member.name,
                member.raw_name,
                member.method,
                member.flags,
                member.crc,
                member.compressed_size,
                member.size,
                member.header_offset,
                data_offset,
                member.needed,
                member.time,
                member.date,
            )
            previous_end, previous = data_end, member
        if previous_end != cd_offset:
            raise ArchiveError(
                f"archive has {cd_offset - previous_end} bytes between its last member and its "
                f"central directory that belong to no member"
            )
        # Keep central directory order: that is the archive's order.
        return {name: checked[name] for name in members}


# The fixed parts of a central and a local header as numpy records, so that
# the fields of every entry are read (and compared) a column at a time.
_CENTRAL_RECORD = np.dtype(
    [
        ("signature", "<u4"),
        ("made_by", "<u2"),
        ("needed", "<u2"),
        ("flags", "<u2"),
        ("method", "<u2"),
        ("time", "<u2"),
        ("date", "<u2"),
        ("crc", "<u4"),
        ("compressed_size", "<u4"),
        ("size", "<u4"),
        ("name_length", "<u2"),
        ("extra_length", "<u2"),
        ("comment_length", "<u2"),
        ("disk", "<u2"),
        ("internal", "<u2"),
        ("external", "<u4"),
        ("header_offset", "<u4"),
    ]
)
_LOCAL_RECORD = np.dtype(
    [
        ("signature", "<u4"),
        ("needed", "<u2"),
        ("flags", "<u2"),
        ("method", "<u2"),
        ("time", "<u2"),
        ("date", "<u2"),
        ("crc", "<u4"),
        ("compressed_size", "<u4"),
        ("size", "<u4"),
        ("name_length", "<u2"),
        ("extra_length", "<u2"),
    ]
)
assert _CENTRAL_RECORD.itemsize == _CENTRAL.size and _LOCAL_RECORD.itemsize == _LOCAL.size
# Bytes of a plain name: printable ASCII except '\\' and ':'. Such a name
# decodes the same as cp437 and UTF-8 and cannot hold a control character,
# so of `_name_problem` only its length and its components are left to check.
_PLAIN_NAME_BYTE = np.zeros(256, dtype=bool)
_PLAIN_NAME_BYTE[0x20:0x7F] = True
_PLAIN_NAME_BYTE[[ord("\\"), ord(":")]] = False
# The writer's longest alignment record: padding under 6 bytes grows by ALIGNMENT.
_ALIGNMENT_RECORD_MAX = ALIGNMENT + _ALIGNMENT_RECORD_MIN - 1
# Name bytes (entries times longest name) beyond which the plain path steps aside.
_PLAIN_NAME_TABLE_MAX = 64 * 2**20


def _plain_members(
    directory: bytes,
    count: int,
    cd_offset: int,
    limits: Limits,
    pread: Callable[[int, int], bytes],
    file: Any,
) -> _Table | None:
    """The members of an archive laid out as pack lays it out, or None.

    `_parse_central_directory` and `_check_local_headers` check an entry at
    a time, some 20 microseconds each: 4 s for 100,000 arrays. Here the same
    checks run a column at a time (numpy), for the plain case only: every
    name printable ASCII, no extra field or comment in the central directory,
    no ZIP64, and in local headers nothing but the writer's alignment record.
    None means "not shown to be plain", never "unsafe": the caller then runs
    the entry-by-entry checks, which accept or refuse the archive (and say
    why) exactly as before. So every condition below implies that those
    checks pass and yield these very members.
    """
    cd = np.frombuffer(directory, dtype=np.uint8)
    # The entries' starts: every central-header signature in the directory,
    # which must chain from its first byte to its last. (A signature inside
    # a name or extra field breaks the chain: the careful path then.)
    starts = np.flatnonzero(
        (cd[:-3] == 0x50) & (cd[1:-2] == 0x4B) & (cd[2:-1] == 0x01) & (cd[3:] == 0x02)
    )
    if len(starts) != count or starts[0] != 0 or starts[-1] + _CENTRAL.size > len(cd):
        return None
    view = np.lib.stride_tricks.sliding_window_view
    fields = view(cd, _CENTRAL.size)[starts].view(_CENTRAL_RECORD)[:, 0]
    n = fields["name_length"].astype(np.int64)
    ends = starts + _CENTRAL.size + n + fields["extra_length"] + fields["comment_length"]
    if (ends[:-1] != starts[1:]).any() or ends[-1] != len(cd):
        return None
    method = fields["method"]
    size = fields["size"].astype(np.int64)
    compressed_size = fields["compressed_size"].astype(np.int64)
    header_offset = fields["header_offset"].astype(np.int64)
    mode = fields["external"] >> 16
    file_type = mode & 0o170000
    plain = (
        (fields["signature"] == _SIG_CENTRAL)
        & (fields["extra_length"] == 0)
        & (fields["comment_length"] == 0)
        & (fields["internal"] == 0)
        & (fields["disk"] == 0)
        # ASCII names, no data descriptor, no encryption: what _flags() says.
        & (fields["flags"] == 0)
        & ((method == _STORED) | (method == _DEFLATED))
        & ((method == _DEFLATED) | (compressed_size == size))
        & ((fields["external"] & _MSDOS_DIRECTORY_ATTR) == 0)
        & ((file_type == 0) | (file_type == stat.S_IFREG))
        & ((mode & 0o7111) == 0)
        # No ZIP64: a field at its maximum needs a record this path does not read.
        & (size != _MAX32)
        & (compressed_size != _MAX32)
        & (header_offset != _MAX32)
        & (n > 0)
        & (n <= limits.max_name_length)
    )
    if not plain.all() or int(size.sum()) > limits.max_total_bytes:
        return None
    for index in np.flatnonzero((method == _DEFLATED) & (size > _RATIO_FLOOR)).tolist():
        # Few members are large and deflated: Python's exact int/float comparison.
        if int(size[index]) > limits.max_compression_ratio * max(int(compressed_size[index]), 1):
            return None

    longest = int(n.max())
    if count * (longest + 1) > _PLAIN_NAME_TABLE_MAX:
        return None
    # One row per name, zero-padded to the longest; `inside` marks its bytes.
    padded = np.concatenate([cd, np.zeros(longest, dtype=np.uint8)])
    name_rows = view(padded, longest)[starts + _CENTRAL.size]
    inside = np.arange(longest) < n[:, None]
    if not _PLAIN_NAME_BYTE[name_rows[inside]].all():
        return None
    # All names as one ASCII text, a name per line: split in C, checked by one regex.
    lines = np.full((count, longest + 1), ord("\n"), dtype=np.uint8)
    lines[:, :longest] = name_rows
    keep = np.ones((count, longest + 1), dtype=bool)
    keep[:, :longest] = inside
    text = lines[keep]
    # An empty, '.' or '..' component (so also a leading or trailing '/', an
    # empty name): "", "." or ".." between two delimiters, '/' or newline.
    lined = np.concatenate([[ord("\n")], text])
    delimiter = (lined == ord("/")) | (lined == ord("\n"))
    dot = lined == ord(".")
    if (
        (delimiter[:-1] & delimiter[1:]).any()
        or (delimiter[:-2] & dot[1:-1] & delimiter[2:]).any()
        or (delimiter[:-3] & dot[1:-2] & dot[2:-1] & delimiter[3:]).any()
    ):
        return None
    names = text[:-1].tobytes().decode("ascii").split("\n")

    # Local headers, in file order: contiguous from offset 0 to the directory.
    # (Pack writes the directory in file order: then nothing is reordered.)
    in_order = bool((header_offset[1:] > header_offset[:-1]).all())
    order = np.arange(count) if in_order else np.argsort(header_offset, kind="stable")
    offsets = header_offset[order]
    lengths = n[order]
    least_ends = offsets + _LOCAL.size + lengths + compressed_size[order]
    if offsets[0] != 0 or (offsets[1:] < least_ends[:-1]).any() or least_ends[-1] > cd_offset:
        return None
    # Each header, its name and an alignment record fit in a row this wide.
    width = _LOCAL.size + longest + _ALIGNMENT_RECORD_MAX
    reach = offsets + width
    # Headers are read in blocks of up to _CHUNK bytes; a gap over
    # _HEADER_WINDOW (a large member's data) starts a new block, so that large
    # data is never read here.
    breaks = (np.flatnonzero(offsets[1:] - reach[:-1] > _HEADER_WINDOW) + 1).tolist()
    breaks.append(count)
    blocks: list[tuple[int, int, int, int]] = []
    first = 0
    next_break = 0
    while first < count:
        while breaks[next_break] <= first:
            next_break += 1
        last = min(
            breaks[next_break],
            int(np.searchsorted(reach, int(offsets[first]) + _CHUNK, side="right")),
        )
        last = max(last, first + 1)
        start = int(offsets[first])
        blocks.append((first, last, start, min(int(reach[last - 1]), cd_offset)))
        first = last
    try:
        # Ask for every block at once (see _check_local_headers).
        for _, _, start, end in blocks:
            os.posix_fadvise(file.fileno(), start, end - start, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass
    header_bytes = bytearray(count * width)
    rows = np.frombuffer(header_bytes, dtype=np.uint8).reshape(count, width)
    for first, last, start, end in blocks:
        data = pread(start, end - start)
        if len(data) != end - start:
            return None
        if last == first + 1:
            header_bytes[first * width : first * width + len(data)] = data
        else:
            block = np.frombuffer(data, dtype=np.uint8)
            short = int(reach[last - 1]) - end
            if short > 0:  # the last header's row runs past the directory's start
                block = np.concatenate([block, np.zeros(short, dtype=np.uint8)])
            rows[first:last] = view(block, width)[offsets[first:last] - start]

    local = rows[:, : _LOCAL.size].copy().view(_LOCAL_RECORD)[:, 0]
    ordered = fields if in_order else fields[order]
    extra_length = local["extra_length"].astype(np.int64)
    same = (local["signature"] == _SIG_LOCAL) & (local["name_length"] == lengths)
    for column in ("needed", "flags", "method", "time", "date", "crc", "compressed_size", "size"):
        same &= local[column] == ordered[column]
    same &= (extra_length == 0) | (
        (extra_length >= _ALIGNMENT_RECORD_MIN) & (extra_length <= _ALIGNMENT_RECORD_MAX)
    )
    if not same.all():
        return None
    if ((rows[:, _LOCAL.size : _LOCAL.size + longest] != name_rows[order]) & inside[order]).any():
        return None
    # The only extra field left is one alignment record: its id, its length,
    # ALIGNMENT, then zeros (what _check_alignment_record asks).
    aligned = np.flatnonzero(extra_length)
    if len(aligned):
        at = _LOCAL.size + lengths[aligned]

        def u16(column: np.ndarray) -> np.ndarray:
            return rows[aligned, column].astype(np.int64) | (
                rows[aligned, column + 1].astype(np.int64) << 8
            )

        record_length = extra_length[aligned]
        if (
            (u16(at) != _EXTRA_ALIGNMENT).any()
            or (u16(at + 2) != record_length - 4).any()
            or (u16(at + 4) != ALIGNMENT).any()
        ):
            return None
        # Zero padding: the largest byte of each padding run, all runs in one
        # pass (reduceat takes [bounds[0], bounds[1]), [bounds[1], bounds[2]), ...,
        # and the last bound to the end: every other result is a run).
        padded = record_length > _ALIGNMENT_RECORD_MIN
        if padded.any():
            base = aligned[padded] * width + at[padded]
            bounds = np.stack([base + _ALIGNMENT_RECORD_MIN, base + record_length[padded]], 1)
            bounds = bounds.reshape(-1)
            if bounds[-1] == rows.size:
                bounds = bounds[:-1]
            if np.maximum.reduceat(rows.reshape(-1), bounds)[::2].any():
                return None
    data_offsets = offsets + _LOCAL.size + lengths + extra_length
    data_ends = data_offsets + compressed_size[order]
    if (offsets[1:] != data_ends[:-1]).any() or data_ends[-1] != cd_offset:
        return None

    data_offset = np.empty(count, dtype=np.int64)
    data_offset[order] = data_offsets
    by_field = {
        "method": method,
        "compressed_size": compressed_size,
        "size": size,
        "header_offset": header_offset,
        "data_offset": data_offset,
    }
    columns = np.stack(
        [by_field[f] if f in by_field else fields[f] for f in _FIELDS]
    ).astype(np.int64)
    table = _Table(names, None, columns)
    if len(table.index) != count:
        return None  # a name twice
    return table


def _check_alignment_record(record: bytes | None, shown: str) -> None:
    """The writer's alignment padding: its alignment, then zeros, and nothing else.

    Padding only shifts where the data starts (which the local header says
    to every reader alike); requiring zeros keeps it from carrying bytes.
    """
    if record is None:
        return
    if len(record) < 2 or _U16.unpack_from(record)[0] != ALIGNMENT or any(record[2:]):
        raise ArchiveError(f"member {shown} is corrupted (malformed alignment padding)")


def _decode_name(raw_name: bytes, flags: int, index: int) -> str:
    """Decode a member name the way zipfile and unzip do (UTF-8 or cp437).

    The cp437 codec is imported with this module: a valid archive (plain
    names) never decodes one, so a lazy import would first happen while a
    hostile archive is read, where the hostile tests refuse any import.
    """
    if flags & _FLAG_UTF8:
        try:
            return raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ArchiveError(
                f"central directory entry {index} has a name that is not valid UTF-8"
            ) from None
    return raw_name.decode("cp437")


def _apply_zip64(
    record: bytes | None,
    size: int,
    compressed_size: int,
    header_offset: int,
    disk: int,
    shown: str,
) -> tuple[int, int, int, int]:
    """Replace overflowed central directory fields with their ZIP64 values.

    The record must hold exactly the overflowed fields: a ZIP64 field with
    nothing to replace, or bytes left over, are places for two readers to
    disagree (and pack never writes them).
    """
    if disk == _MAX16:
        raise ArchiveError("archive spans multiple disks, which is not supported")
    values = [size, compressed_size, header_offset]
    overflowed = [slot for slot, value in enumerate(values) if value == _MAX32]
    if record is None:
        if overflowed:
            raise ArchiveError(f"member {shown} is corrupted (ZIP64 extra field missing)")
        return size, compressed_size, header_offset, disk
    if len(record) != 8 * len(overflowed):
        raise ArchiveError(
            f"member {shown} is corrupted (its ZIP64 extra field does not match its "
            f"overflowed fields)"
        )
    for cursor, slot in enumerate(overflowed):
        values[slot] = _U64.unpack_from(record, 8 * cursor)[0]
    return values[0], values[1], values[2], disk


# Extra fields each header may carry. Everything else is refused: Info-ZIP's
# Unicode Path (0x7075) renames a member for unzip alone, and any field an
# unknown reader might interpret is a second reading of the archive.
_CENTRAL_EXTRAS = frozenset({_EXTRA_ZIP64})
_LOCAL_EXTRAS = frozenset({_EXTRA_ZIP64, _EXTRA_ALIGNMENT})
_EXTRA_NAMES = {
    0x7075: "an Info-ZIP Unicode Path field, which renames the member for unzip alone",
    0x6375: "an Info-ZIP Unicode Comment field",
    0x5455: "an extended timestamp field",
    0x7875: "a Unix UID/GID field",
    0x000A: "an NTFS field",
}


def _parse_extra(extra: bytes, shown: str, allowed: frozenset[int]) -> dict[int, bytes]:
    """Split an extra field into its records: each at most once, of an allowed kind, no slack."""
    records: dict[int, bytes] = {}
    position = 0
    while position < len(extra):
        if position + _EXTRA_HEADER.size > len(extra):
            raise ArchiveError(f"member {shown} is corrupted (malformed extra field)")
        kind, length = _EXTRA_HEADER.unpack_from(extra, position)
        start = position + _EXTRA_HEADER.size
        position = start + length
        if position > len(extra):
            raise ArchiveError(f"member {shown} is corrupted (malformed extra field)")
        if kind not in allowed:
            what = _EXTRA_NAMES.get(kind, f"an extra field of type {kind:#06x}")
            raise ArchiveError(
                f"member {shown} carries {what}; reprokit archives hold only ZIP64 and "
                f"alignment fields, so that every zip reader sees the same members"
            )
        if kind in records:
            raise ArchiveError(
                f"member {shown} is corrupted (two extra fields of type {kind:#06x})"
            )
        records[kind] = extra[start:position]
    return records


def _check_canonical_entry(
    shown: str, raw_name: bytes, flags: int, comment_length: int, internal: int, mode: int
) -> None:
    """Refuse central directory fields that pack never writes and some reader would act on."""
    if flags & _FLAG_DATA_DESCRIPTOR:
        raise ArchiveError(
            f"member {shown} defers its sizes to a data descriptor, which reprokit never writes"
        )
    if flags != _flags(raw_name):
        raise ArchiveError(
            f"member {shown} has general-purpose flags {flags:#06x}; reprokit writes only the "
            f"UTF-8 flag, set exactly when the name is not ASCII (readers decode other names "
            f"differently)"
        )
    if comment_length or internal:
        raise ArchiveError(
            f"member {shown} has a file comment or internal attributes, which reprokit never writes"
        )
    if mode & 0o7111:
        raise ArchiveError(
            f"member {shown} has mode {mode & 0o7777:04o}; reprokit members are plain, "
            f"non-executable files (unzip would apply the mode)"
        )
