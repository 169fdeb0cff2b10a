"""Tests for reprokit.archive._container: round trips, interoperability, atomic writes and
refusal of hostile archives (each built here with the stdlib, on real files)."""

from __future__ import annotations

import gc
import os
import shutil
import stat
import struct
import subprocess
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprokit._errors import ArchiveError
from reprokit.archive import _container
from reprokit.archive._container import (
    ALIGNMENT,
    ArchiveReader,
    ArchiveWriter,
    Limits,
    is_safe_member_name,
)

SIZES = [0, 1, 63, 64, 65, 2**20]
UNZIP = shutil.which("unzip")


# -- helpers -----------------------------------------------------------------


def _payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _text(size: int) -> bytes:
    """Text that deflates a few times over, like a real manifest or README."""
    lines = (b"%d: %08x\n" % (i, i * 2654435761 % 2**32) for i in range(size // 8 + 1))
    return b"".join(lines)[:size]


def _read_everything(path, limits: Limits | None = None) -> dict[str, bytes]:
    """Open an archive and read every member the way reprokit would."""
    result = {}
    with ArchiveReader(path, limits) as reader:
        for name in reader.names:
            try:
                result[name] = reader.read_aligned(name).tobytes()
            except ArchiveError as exc:
                if "compressed" not in str(exc):
                    raise
                result[name] = reader.read_bytes(name)
    return result


def _assert_unzip_ok(path) -> None:
    if UNZIP is None:
        print("skipping the unzip -t check: no unzip executable on this machine")
        return
    done = subprocess.run([UNZIP, "-t", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _data_offset(data: bytes, header_offset: int) -> int:
    name_length, extra_length = struct.unpack_from("<HH", data, header_offset + 26)
    return header_offset + 30 + name_length + extra_length


def _central_offsets(data: bytes) -> list[int]:
    """Offsets of the central directory records of a small (non-ZIP64) zip."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    offsets, position = [], cd_offset
    for _ in range(count):
        offsets.append(position)
        lengths = struct.unpack_from("<HHH", data, position + 28)
        position += 46 + sum(lengths)
    return offsets


def _local_offsets(data: bytes) -> list[int]:
    return [struct.unpack_from("<I", data, offset + 42)[0] for offset in _central_offsets(data)]


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into(fmt, patched, offset, value)
    return bytes(patched)


def _stdlib_zip(path, members, *, compression=zipfile.ZIP_STORED) -> bytes:
    """Write `members` (name or ZipInfo -> bytes) with zipfile; return the bytes."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path.read_bytes()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def sample(tmp_path):
    """A small valid reprokit-style archive and its contents."""
    contents = {
        "manifest.json": b'{"format": 1}\n',
        "structure.msgpack": _payload(300, seed=1),
        "arrays/0.bin": _payload(1000, seed=2),
        "arrays/1.bin": np.arange(17, dtype=np.float32).tobytes(),
        "README.md": _text(5000),
    }
    path = tmp_path / "sample.repro.zip"
    with ArchiveWriter(path) as writer:
        writer.add_bytes("manifest.json", contents["manifest.json"])
        writer.add_bytes("structure.msgpack", contents["structure.msgpack"])
        writer.add_buffer("arrays/0.bin", np.frombuffer(contents["arrays/0.bin"], np.uint8))
        writer.add_buffer("arrays/1.bin", np.arange(17, dtype=np.float32))
        writer.add_bytes("README.md", contents["README.md"], compress=True)
    return path, contents


# -- round trips and interoperability ------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(tmp_path, size):
    data = _payload(size, seed=size)
    text = _text(size)
    floats = np.random.default_rng(size).standard_normal(size // 4 + 1).astype(np.float32)
    path = tmp_path / "a.repro.zip"
    with ArchiveWriter(path) as writer:
        writer.add_bytes("bytes", data)
        writer.add_bytes("deflated", text, compress=True)
        writer.add_bytes("incompressible", data, compress=True)
        writer.add_buffer("array", np.frombuffer(data, np.uint8))
        writer.add_buffer("floats", floats)
        writer.add_buffer("view", memoryview(data))

    with ArchiveReader(path) as reader:
        assert reader.names == ["bytes", "deflated", "incompressible", "array", "floats", "view"]
        for name in ("bytes", "incompressible", "array", "view"):
            assert reader.size(name) == size
            assert reader.read_bytes(name) == data
        assert reader.read_bytes("deflated") == text
        assert reader.read_bytes("floats") == floats.tobytes()
        for name in ("bytes", "array", "view", "floats"):
            array = reader.read_aligned(name)
            assert array.dtype == np.uint8
            assert array.ctypes.data % ALIGNMENT == 0
            assert array.tobytes() == (floats.tobytes() if name == "floats" else data)
        out = np.empty_like(floats)
        reader.read_into("floats", out)
        np.testing.assert_array_equal(out, floats)

    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        for info in archive.infolist():
            if info.compress_type == zipfile.ZIP_STORED:
                assert _data_offset(raw, info.header_offset) % ALIGNMENT == 0, info.filename
        if size > 100:
            assert archive.getinfo("deflated").compress_type == zipfile.ZIP_DEFLATED
    _assert_unzip_ok(path)


def test_large_buffer_is_streamed_and_checked(tmp_path):
    # Bigger than the pipelining threshold, so the CRC helper thread is used
    # on both sides; odd size so the last chunk is partial.
    data = np.random.default_rng(7).integers(0, 256, 40 * 2**20 + 3, dtype=np.uint8)
    path = tmp_path / "big.repro.zip"
    with ArchiveWriter(path) as writer:
        writer.add_bytes("manifest.json", b"{}")
        writer.add_buffer("arrays/0.bin", data)
    with ArchiveReader(path) as reader:
        array = reader.read_aligned("arrays/0.bin")
        assert array.ctypes.data % ALIGNMENT == 0
        np.testing.assert_array_equal(array, data)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("arrays/0.bin").CRC == zlib.crc32(data)

    raw = bytearray(path.read_bytes())
    offset = _data_offset(bytes(raw), _local_offsets(bytes(raw))[1])
    raw[offset + 30 * 2**20] ^= 0x01
    _write(path, bytes(raw))
    with ArchiveReader(path) as reader, pytest.raises(ArchiveError, match="CRC mismatch"):
        reader.read_aligned("arrays/0.bin")


@pytest.mark.parametrize("threshold", [0, 100])
def test_zip64_records_forced(tmp_path, threshold):
    contents = {f"arrays/{size}.bin": _payload(size, seed=size) for size in SIZES}
    contents["README.md"] = _text(4000)
    path = tmp_path / "z64.repro.zip"
    with ArchiveWriter(path, zip64_threshold=threshold) as writer:
        for name, data in contents.items():
            if name.endswith(".md"):
                writer.add_bytes(name, data, compress=True)
            else:
                writer.add_buffer(name, data)
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw
    assert _read_everything(path) == contents
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == list(contents)
    _assert_unzip_ok(path)


def test_zip64_member_count(tmp_path):
    count = 70_000
    path = tmp_path / "many.repro.zip"
    with ArchiveWriter(path) as writer:
        for index in range(count):
            writer.add_bytes(f"m/{index}", b"%d" % index)
    raw = path.read_bytes()
    assert struct.unpack_from("<H", raw, len(raw) - 12)[0] == 0xFFFF
    with ArchiveReader(path) as reader:
        assert len(reader.names) == count
        assert reader.read_bytes("m/69999") == b"69999"
    with zipfile.ZipFile(path) as archive:
        assert len(archive.infolist()) == count
    if UNZIP is not None:
        done = subprocess.run([UNZIP, "-tq", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_reads_archives_written_by_zipfile(tmp_path):
    path = tmp_path / "py.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", _text(3000), compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("b.bin", _payload(100))
        with archive.open("c.bin", "w", force_zip64=True) as member:
            member.write(_payload(50, seed=3))
    assert _read_everything(path) == {
        "a.txt": _text(3000),
        "b.bin": _payload(100),
        "c.bin": _payload(50, seed=3),
    }


def test_output_is_deterministic(tmp_path):
    for name in ("one.zip", "two.zip"):
        with ArchiveWriter(tmp_path / name) as writer:
            writer.add_bytes("manifest.json", b"{}", compress=True)
            writer.add_buffer("arrays/0.bin", np.arange(100, dtype=np.int64))
    with ArchiveReader(tmp_path / "one.zip") as one, ArchiveReader(tmp_path / "two.zip") as two:
        assert one.sha256() == two.sha256()
        assert len(one.sha256()) == 64


def test_sha256_covers_the_whole_file(sample):
    import hashlib

    path, _ = sample
    with ArchiveReader(path) as reader:
        assert reader.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()


# -- atomic writes ---------------------------------------------------------------


def _folder_listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_exception_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "bug.repro.zip"
    target.write_bytes(b"previous archive")
    with pytest.raises(RuntimeError, match="boom"):
        with ArchiveWriter(target) as writer:
            writer.add_buffer("arrays/0.bin", np.zeros(1000))
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous archive"
    assert _folder_listing(tmp_path) == ["bug.repro.zip"]


def test_temp_file_lives_next_to_target_until_commit(tmp_path):
    target = tmp_path / "bug.repro.zip"
    writer = ArchiveWriter(target)
    writer.add_bytes("manifest.json", b"{}")
    (temp,) = _folder_listing(tmp_path)
    assert temp.startswith(".bug.repro.zip.tmp-")
    assert not target.exists()
    writer.commit()
    assert _folder_listing(tmp_path) == ["bug.repro.zip"]
    assert _read_everything(target) == {"manifest.json": b"{}"}
    with pytest.raises(ValueError):
        writer.add_bytes("more", b"")


def test_commit_replaces_previous_file(tmp_path):
    target = tmp_path / "bug.repro.zip"
    target.write_bytes(b"old")
    with ArchiveWriter(target) as writer:
        writer.add_bytes("manifest.json", b"new")
    assert _read_everything(target) == {"manifest.json": b"new"}


def test_abort_and_abandoned_writers_leave_nothing(tmp_path):
    target = tmp_path / "bug.repro.zip"
    writer = ArchiveWriter(target)
    writer.add_bytes("manifest.json", b"{}")
    writer.abort()
    writer.abort()
    assert _folder_listing(tmp_path) == []

    writer = ArchiveWriter(target)
    writer.add_bytes("manifest.json", b"{}")
    del writer
    gc.collect()
    assert _folder_listing(tmp_path) == []


@pytest.mark.parametrize(
    "name", ["../x", "/etc/x", "a\\b", "C:x", "a/../b", "a//b", "./a", "d/", "", "a\x00b"]
)
def test_writer_refuses_unsafe_names(tmp_path, name):
    with ArchiveWriter(tmp_path / "a.zip") as writer:
        with pytest.raises(ArchiveError, match="cannot add member"):
            writer.add_bytes(name, b"x")
        writer.add_bytes("fine", b"x")
    assert _read_everything(tmp_path / "a.zip") == {"fine": b"x"}


def test_writer_refuses_duplicates(tmp_path):
    with ArchiveWriter(tmp_path / "a.zip") as writer:
        writer.add_bytes("a", b"x")
        with pytest.raises(ArchiveError, match="already has it"):
            writer.add_buffer("a", b"y")


def test_is_safe_member_name():
    assert is_safe_member_name("arrays/3.bin")
    assert is_safe_member_name("données/é.txt")
    for name in ["../x", "/x", "a\\b", "C:x", "a/./b", "a/", "a\x1fb", "a\u202eb", "x" * 256]:
        assert not is_safe_member_name(name), name


# -- hostile archives --------------------------------------------------------------


def _assert_refused(path, match: str, limits: Limits | None = None) -> None:
    with pytest.raises(ArchiveError, match=match):
        _read_everything(path, limits)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../x", r"'\.\.' component"),
        ("a/../../x", r"'\.\.' component"),
        ("/etc/x", "absolute path"),
        ("a\\b", "backslash"),
        ("..\\x", "backslash"),
        ("C:x", "drive letter"),
        ("C:/x", "drive letter"),
        ("a//b", "empty component"),
        ("a\u202eb", "invisible"),
        ("x" * 300, "longer than 255"),
    ],
)
def test_unsafe_names_are_refused(tmp_path, name, match):
    path = tmp_path / "h.zip"
    _stdlib_zip(path, [(zipfile.ZipInfo(name), b"data")])
    _assert_refused(path, match)


@pytest.mark.parametrize("bad", [b"a\x00b", b"a\nb", b"a\x7fb"])
def test_control_characters_are_refused(tmp_path, bad):
    # zipfile truncates names at NUL, so write a placeholder and patch it.
    path = tmp_path / "h.zip"
    data = _stdlib_zip(path, [("a_b", b"data")])
    _assert_refused(_write(path, data.replace(b"a_b", bad)), "control character")


def test_duplicate_names_are_refused(tmp_path):
    path = tmp_path / "h.zip"
    data = _stdlib_zip(path, [("a.txt", b"one"), ("b.txt", b"two")])
    _assert_refused(_write(path, data.replace(b"b.txt", b"a.txt")), "more than once")


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        (stat.S_IFLNK | 0o777, "symbolic link"),
        (stat.S_IFDIR | 0o755, "directory"),
        (stat.S_IFIFO | 0o644, "FIFO"),
        (stat.S_IFCHR | 0o644, "character device"),
    ],
)
def test_special_files_are_refused(tmp_path, mode, match):
    info = zipfile.ZipInfo("entry")
    info.create_system = 3
    info.external_attr = mode << 16
    path = tmp_path / "h.zip"
    _stdlib_zip(path, [(info, b"/etc/passwd")])
    _assert_refused(path, match)


def test_directory_entries_are_refused(tmp_path):
    path = tmp_path / "h.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.mkdir("folder")
    _assert_refused(path, "directory entry")
    dos = zipfile.ZipInfo("folder2")
    dos.create_system = 0
    dos.external_attr = 0x10
    _stdlib_zip(path, [(dos, b"")])
    _assert_refused(path, "directory entry")


def test_encrypted_members_are_refused(tmp_path):
    path = tmp_path / "h.zip"
    data = _stdlib_zip(path, [("secret", b"data")])
    (central,) = _central_offsets(data)
    (local,) = _local_offsets(data)
    data = _patch(data, central + 8, "<H", 1)
    _assert_refused(_write(path, data), "encrypted")
    data = _patch(data, local + 6, "<H", 1)
    _assert_refused(_write(path, data), "encrypted")


def test_unsupported_compression_is_refused(tmp_path):
    path = tmp_path / "h.zip"
    _stdlib_zip(path, [("a", _text(1000))], compression=zipfile.ZIP_BZIP2)
    _assert_refused(path, "compression method 12")
    data = _stdlib_zip(path, [("a", b"data")])
    data = _patch(data, _central_offsets(data)[0] + 10, "<H", 99)
    data = _patch(data, _local_offsets(data)[0] + 8, "<H", 99)
    _assert_refused(_write(path, data), "compression method 99")


def test_deflate_bomb_is_refused_at_open(tmp_path):
    path = tmp_path / "bomb.zip"
    zeros = bytes(2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", b"{}")
        with archive.open("structure.msgpack", "w") as member:
            for _ in range(100):
                member.write(zeros)
    assert path.stat().st_size < 200_000
    with pytest.raises(ArchiveError, match="compression ratio"):
        ArchiveReader(path)
    # Even with the ratio limit lifted, the member is too big to inflate.
    lifted = Limits(max_compression_ratio=1e9)
    with ArchiveReader(path, lifted) as reader:
        with pytest.raises(ArchiveError, match="too large to read into memory"):
            reader.read_bytes("structure.msgpack")


def test_lying_deflate_size_never_inflates_past_declared(tmp_path):
    # Declares 1000 bytes but inflates to 1 MiB: the decompressor must stop.
    path = tmp_path / "liar.zip"
    data = _stdlib_zip(path, [("a", bytes(2**20))], compression=zipfile.ZIP_DEFLATED)
    data = _patch(data, _central_offsets(data)[0] + 24, "<I", 1000)
    data = _patch(data, _local_offsets(data)[0] + 22, "<I", 1000)
    _assert_refused(_write(path, data), "beyond its declared size")


def test_writer_never_produces_what_reader_calls_a_bomb(tmp_path):
    path = tmp_path / "a.zip"
    with ArchiveWriter(path) as writer:
        writer.add_bytes("zeros", bytes(10 * 2**20), compress=True)
    assert _read_everything(path) == {"zeros": bytes(10 * 2**20)}


def test_member_count_and_size_limits(sample):
    path, contents = sample
    _assert_refused(path, "5 members; the limit is 3", Limits(max_members=3))
    _assert_refused(path, "bytes of member data", Limits(max_total_bytes=1000))
    _assert_refused(path, "longer than 5 bytes", Limits(max_name_length=5))
    with ArchiveReader(path, Limits(max_small_member_bytes=100)) as reader:
        with pytest.raises(ArchiveError, match="too large to read into memory"):
            reader.read_bytes("arrays/0.bin")
        assert reader.read_aligned("arrays/0.bin").tobytes() == contents["arrays/0.bin"]


def test_truncated_archives_are_refused(sample):
    path, _ = sample
    data = path.read_bytes()
    for cut in [1, 4, 30, 100, len(data) // 2, len(data) - 23, len(data) - 22, len(data) - 1]:
        _write(path, data[:cut])
        _assert_refused(path, "truncated|not a zip|corrupted")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"just some text, certainly not a zip archive\n" * 10, "not a zip archive"),
        (b"PK\x05\x06" + bytes(18), "no members"),
    ],
)
def test_non_archives_are_refused(tmp_path, content, match):
    _assert_refused(_write(tmp_path / "x.zip", content), match)


def test_missing_file_is_an_archive_error(tmp_path):
    _assert_refused(tmp_path / "nowhere.zip", "cannot open archive")


def test_prepended_data_is_refused(sample):
    path, _ = sample
    _write(path, b"#!/bin/sh\nexit 0\n" + path.read_bytes())
    _assert_refused(path, "central directory")


def test_flipped_data_byte_is_caught_on_read(sample):
    path, contents = sample
    original = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    for info in infos:
        start = _data_offset(original, info.header_offset)
        for position in {start, start + info.compress_size // 2, start + info.compress_size - 1}:
            corrupted = bytearray(original)
            corrupted[position] ^= 0x20
            _write(path, bytes(corrupted))
            with ArchiveReader(path) as reader:
                if info.compress_type == zipfile.ZIP_STORED:
                    with pytest.raises(ArchiveError, match=rf"'{info.filename}' is corrupted"):
                        reader.read_aligned(info.filename)
                    with pytest.raises(ArchiveError, match=r"is corrupted \(CRC mismatch\)"):
                        reader.read_bytes(info.filename)
                else:
                    # A flip in the padding bits after the final deflate
                    # block changes nothing; anything else must be caught.
                    try:
                        data = reader.read_bytes(info.filename)
                    except ArchiveError as exc:
                        assert f"member '{info.filename}' is corrupted" in str(exc)
                    else:
                        assert data == contents[info.filename]
                # Other members stay readable.
                other = next(name for name in contents if name != info.filename)
                assert reader.read_bytes(other) == contents[other]


def test_declared_size_larger_than_actual(tmp_path, sample):
    path, _ = sample
    data = path.read_bytes()
    central, local = _central_offsets(data)[2], _local_offsets(data)[2]
    for field in (20, 24):
        data = _patch(data, central + field, "<I", 1000 + 64)
    for field in (18, 22):
        data = _patch(data, local + field, "<I", 1000 + 64)
    _assert_refused(_write(path, data), "overlaps")

    # The last member growing past the data area.
    last = tmp_path / "last.zip"
    plain = _stdlib_zip(last, [("a", b"x" * 100)])
    for field in (20, 24):
        plain = _patch(plain, _central_offsets(plain)[0] + field, "<I", 10_000)
    for field in (18, 22):
        plain = _patch(plain, _local_offsets(plain)[0] + field, "<I", 10_000)
    _assert_refused(_write(last, plain), "runs past the data area")

    # A deflated member that inflates to less than it declares.
    deflated = _stdlib_zip(last, [("a", _text(1000))], compression=zipfile.ZIP_DEFLATED)
    deflated = _patch(deflated, _central_offsets(deflated)[0] + 24, "<I", 1200)
    deflated = _patch(deflated, _local_offsets(deflated)[0] + 22, "<I", 1200)
    _assert_refused(_write(last, deflated), "size mismatch")


def test_local_header_must_match_central_directory(sample):
    path, _ = sample
    data = path.read_bytes()
    local = _local_offsets(data)[0]
    renamed = data[: local + 30] + b"MANIFEST.json" + data[local + 43 :]
    _assert_refused(_write(path, renamed), "names another file")
    moved = _patch(data, _central_offsets(data)[1] + 42, "<I", local)
    _assert_refused(_write(path, moved), "names another file|overlaps")


def test_missing_member_and_misuse(sample):
    path, contents = sample
    with ArchiveReader(path) as reader:
        assert "manifest.json" in reader and "x" not in reader
        with pytest.raises(ArchiveError, match="archive has no member 'x'"):
            reader.read_bytes("x")
        with pytest.raises(ArchiveError, match="archive has no member"):
            reader.size("x")
        with pytest.raises(ArchiveError, match="holds 68 bytes"):
            reader.read_into("arrays/1.bin", np.empty(16, np.float32))
        # Only read_into insists on stored data; read_aligned inflates deflated members
        # (arrays compressed to fit an archive under --max-size).
        with pytest.raises(ArchiveError, match="compressed"):
            reader.read_into("README.md", np.empty(reader.size("README.md"), np.uint8))
        assert reader.read_aligned("README.md").tobytes() == contents["README.md"]
        with pytest.raises(ValueError, match="writable"):
            reader.read_into("arrays/1.bin", bytes(68))
        assert reader.read_bytes("README.md") == contents["README.md"]


# -- fuzzing ---------------------------------------------------------------------------

_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(
        st.just("flip"),
        st.lists(
            st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
            min_size=1,
            max_size=4,
        ),
    ),
)


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "base.zip"
    contents = {
        "manifest.json": b'{"format": 1, "arrays": 2}',
        "arrays/0.bin": _payload(200, seed=5),
        "arrays/1.bin": bytes(70),
        "README.md": _text(2000),
    }
    with ArchiveWriter(path) as writer:
        writer.add_bytes("manifest.json", contents["manifest.json"])
        writer.add_buffer("arrays/0.bin", contents["arrays/0.bin"])
        writer.add_buffer("arrays/1.bin", np.zeros(70, np.uint8))
        writer.add_bytes("README.md", contents["README.md"], compress=True)
    return folder, path.read_bytes(), contents


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=_mutations)
def test_damage_gives_archive_error_or_correct_data(fuzz_base, mutation):
    folder, original, contents = fuzz_base
    damaged = bytearray(original)
    kind, detail = mutation
    if kind == "truncate":
        damaged = damaged[: int(detail * len(original))]
    else:
        for where, mask in detail:
            damaged[int(where * len(original))] ^= mask
    path = _write(folder / "damaged.zip", bytes(damaged))
    try:
        reader = ArchiveReader(path)
    except ArchiveError:
        return
    with reader:
        for name, expected in contents.items():
            try:
                assert reader.read_bytes(name) == expected
                if name.startswith("arrays/"):
                    assert reader.read_aligned(name).tobytes() == expected
            except ArchiveError:
                pass


def test_snapshot_is_a_complete_archive_and_later_members_replace_its_directory(tmp_path):
    target = tmp_path / "snap.zip"
    with ArchiveWriter(target) as writer:
        writer.add_bytes("a.txt", b"first")
        writer.add_buffer("b.bin", np.arange(100, dtype=np.float32))
        snapshot = writer.snapshot()
        # Says it is unfinished: only the self-check's reader accepts it.
        with pytest.raises(ArchiveError, match="unfinished"):
            ArchiveReader(snapshot)
        with ArchiveReader(snapshot, Limits(accept_unfinished=True)) as reader:
            assert reader.names == ["a.txt", "b.bin"]
            assert reader.read_bytes("a.txt") == b"first"
        writer.add_bytes("c.json", b"{}", compress=True)
    assert not os.path.exists(snapshot)
    with ArchiveReader(target) as reader:
        assert reader.names == ["a.txt", "b.bin", "c.json"]
        assert np.array_equal(reader.read_aligned("b.bin").view(np.float32), np.arange(100, dtype=np.float32))
    assert zipfile.ZipFile(target).testzip() is None


def test_deflated_members_are_read_aligned_too(tmp_path):
    target = tmp_path / "deflated.zip"
    data = np.zeros(10_000, dtype=np.float32)
    data[::7] = np.nan
    with ArchiveWriter(target) as writer:
        writer.add_bytes("arrays/0.bin", data.tobytes(), compress=True)
    with ArchiveReader(target) as reader:
        array = reader.read_aligned("arrays/0.bin")
        assert array.ctypes.data % 64 == 0
        assert array.view(np.float32).tobytes() == data.tobytes()


# -- the column-at-a-time path agrees with the entry-by-entry one ------------------


def _outcome(path, limits: Limits | None = None):
    """What a reader makes of `path`: its members and their bytes, or its refusal."""
    try:
        with ArchiveReader(path, limits) as reader:
            members = [reader._member(name) for name in reader.names]
            data = {}
            for name in reader.names:
                try:
                    data[name] = reader.read_bytes(name)
                except ArchiveError as exc:
                    data[name] = str(exc)
            return "opened", members, data
    except ArchiveError as exc:
        return "refused", str(exc)


def _both_ways(path, monkeypatch, limits: Limits | None = None):
    """(outcome, outcome with the plain path switched off, whether the plain path answered)."""
    answered = []
    plain = _container._plain_members

    def spy(*args):
        table = plain(*args)
        answered.append(table is not None)
        return table

    with monkeypatch.context() as patch:
        patch.setattr(_container, "_plain_members", spy)
        fast = _outcome(path, limits)
        patch.setattr(_container, "_plain_members", lambda *args: None)
        careful = _outcome(path, limits)
    return fast, careful, any(answered)


def _plain_archive(path) -> None:
    with ArchiveWriter(path) as writer:
        writer.add_bytes("manifest.json", _text(100_000), compress=True)
        writer.add_buffer("arrays/0.bin", np.arange(5, dtype=np.float32))
        writer.add_buffer("arrays/1.bin", b"")
        writer.add_bytes("code/pkg/mod.py", b"x = 1\n")


def test_plain_archives_open_the_same_either_way(tmp_path, monkeypatch):
    path = tmp_path / "plain.zip"
    with ArchiveWriter(path) as writer:
        writer.add_bytes("manifest.json", _text(200_000), compress=True)
        # A large member between small ones: its data is skipped, not read.
        for index in range(50):
            writer.add_buffer(f"arrays/{index}.bin", _payload(index * 37 % 300, index))
        writer.add_buffer("arrays/big.bin", _payload(300_000))
        writer.add_buffer("arrays/empty.bin", b"")
        writer.add_bytes("a b/.hidden/x...y", b"names may hold spaces and dots")
    fast, careful, answered = _both_ways(path, monkeypatch)
    assert answered and fast[0] == "opened"
    assert fast == careful


@pytest.mark.parametrize(
    "name", ["naïve.txt", "tab\tname", "back\\slash", "c:drive", "./dot", "a//b", "a/../b", "x/"]
)
def test_other_names_are_left_to_the_careful_path(tmp_path, monkeypatch, name):
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arrays/0.bin", b"0123")
        archive.writestr(name, b"data")
    fast, careful, answered = _both_ways(path, monkeypatch)
    assert not answered
    assert fast == careful


def test_zip64_and_utf8_archives_open_the_same_either_way(tmp_path, monkeypatch):
    path = tmp_path / "zip64.zip"
    with ArchiveWriter(path, zip64_threshold=64) as writer:
        writer.add_buffer("arrays/0.bin", _payload(10))
        writer.add_buffer("arrays/1.bin", _payload(1000))
        writer.add_bytes("naïve.txt", b"utf-8 name")
    fast, careful, answered = _both_ways(path, monkeypatch)
    assert not answered and fast[0] == "opened"
    assert fast == careful


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_name_length=12),
        Limits(max_total_bytes=100_020),
        Limits(max_compression_ratio=1.5),
        Limits(max_members=3),
    ],
)
def test_limits_refuse_the_same_either_way(tmp_path, monkeypatch, limits):
    path = tmp_path / "plain.zip"
    _plain_archive(path)
    fast, careful, _ = _both_ways(path, monkeypatch, limits)
    assert fast == careful and fast[0] == "refused"


def test_every_changed_header_byte_is_judged_the_same_either_way(tmp_path, monkeypatch):
    """Each byte of every local header, central record and end record, changed:
    the plain path must accept exactly what the careful path accepts, and
    leave the refusal (and its message) to it."""
    original = tmp_path / "plain.zip"
    _plain_archive(original)
    data = original.read_bytes()
    with ArchiveReader(original) as reader:
        members = [reader._member(name) for name in reader.names]
    headers = set()
    for member in members:
        headers.update(range(member.header_offset, member.data_offset))
    cd_start = members[-1].data_offset + members[-1].compressed_size
    headers.update(range(cd_start, len(data)))
    path = tmp_path / "changed.zip"
    opened = 0
    for position in sorted(headers):
        for value in {0x00, data[position] ^ 0x01, ord("/")} - {data[position]}:
            path.write_bytes(data[:position] + bytes([value]) + data[position + 1 :])
            fast, careful, _ = _both_ways(path, monkeypatch)
            assert fast == careful, (position, value)
            opened += fast[0] == "opened"
    assert opened  # some changes (times, a CRC's effect on reading) are not refused at open


def _many_small(path) -> None:
    with ArchiveWriter(path) as writer:
        writer.add_bytes("manifest.json", _text(5000), compress=True)
        for index in range(40):
            writer.add_buffer(f"arrays/{index}.bin", _payload(100 + 50 * index, index))
        writer.add_buffer("arrays/big.bin", _payload(3000))


def _corrupt(path, reader_names, *names) -> None:
    with ArchiveReader(path) as reader:
        offsets = [reader._member(name).data_offset for name in names]
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _batch_outcome(call):
    try:
        result = call()
    except (ArchiveError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None if result is None else [bytes(view) for view in result]


@pytest.mark.parametrize(
    "corrupted",
    [(), ("arrays/7.bin",), ("arrays/big.bin", "arrays/3.bin"), ("arrays/30.bin", "arrays/2.bin")],
)
def test_batch_reads_match_member_by_member_reads(tmp_path, monkeypatch, corrupted):
    # A small _CHUNK makes several batches and spans, and members too large for one.
    monkeypatch.setattr(_container, "_CHUNK", 1000)
    path = tmp_path / "small.zip"
    _many_small(path)
    _corrupt(path, None, *corrupted)
    with ArchiveReader(path) as reader:
        names = [name for name in reader.names if name.startswith("arrays/")]
        shuffled = names[::-1][:25] + names[:10] + ["manifest.json"] + names[5:8]
        for chosen in (names, shuffled, reader.names, [], ["arrays/1.bin", "no/such.bin"]):
            assert _batch_outcome(lambda c=chosen: reader.read_small_members(c)) == _batch_outcome(
                lambda c=chosen: reader._read_small_members_each(c)
            )
            assert _batch_outcome(lambda c=chosen: reader.verify_members(c)) == _batch_outcome(
                lambda c=chosen: reader._verify_members_each(c)
            )
    reader.close()
    assert _batch_outcome(lambda: reader.read_small_members(names)) == (
        "ValueError",
        "this archive is closed",
    )
