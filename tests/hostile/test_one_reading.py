"""One reading of the zip (SECURITY.md, class 1): reprokit, zipfile and unzip see the same archive.

Every archive `pack` writes, and every class-1 archive of the hostile corpus
that reprokit accepts (none should be), must list the same member names
with the same bytes in Python's `zipfile`, Info-ZIP `unzip` and reprokit's
own `ArchiveReader`. The corpus cases are exactly the ways the three
disagree (a comment holding a second archive, a Unicode Path field that
renames a member for unzip alone, bytes in gaps, headers that disagree).
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import corpus
import pytest
from fuzzer import read_members

from reprokit._errors import ArchiveError
from reprokit.archive._container import ArchiveReader

UNZIP = shutil.which("unzip")
needs_unzip = pytest.mark.skipif(UNZIP is None, reason="Info-ZIP unzip is not installed")


def _pack(folder: Path, *, compress: bool) -> Path:
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models import simple_mlp

    import reprokit

    model = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 8, 4]
    )
    argument = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    path = folder / f"base-{compress}.repro.zip"
    reprokit.pack(selection, argument, out=path, compress=compress, check=False)
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("one-reading")
    return [_pack(folder, compress=False), _pack(folder, compress=True)]


def _reprokit_view(path: Path) -> dict[str, bytes]:
    with ArchiveReader(path) as reader:
        return {name: reader.read_bytes(name) for name in reader.names}


def _zipfile_view(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _unzip_view(path: Path, folder: Path) -> dict[str, bytes]:
    """What `unzip` extracts: names as it writes them to disk, and their bytes."""
    target = folder / "unzipped"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    done = subprocess.run(
        [UNZIP, "-qq", "-o", str(path), "-d", str(target)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    extracted = {
        str(file.relative_to(target)): file.read_bytes()
        for file in sorted(target.rglob("*"))
        if file.is_file()
    }
    if done.returncode not in (0, 1):  # 1: warnings only
        extracted["<unzip failed>"] = done.stderr.encode()
    return extracted


@needs_unzip
def test_packed_archives_read_the_same_in_all_three_readers(packed, tmp_path):
    for path in packed:
        ours = _reprokit_view(path)
        assert ours == _zipfile_view(path)
        assert ours == _unzip_view(path, tmp_path)
        listing = subprocess.run(
            [UNZIP, "-Z1", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert listing == list(ours)


CLASS_1 = sorted(name for name in corpus.CASES if name.startswith("zip-"))


@needs_unzip
@pytest.mark.parametrize("name", CLASS_1)
def test_what_reprokit_accepts_reads_the_same_everywhere(name, packed, tmp_path):
    """A class-1 archive is refused; were it not, all three readers would have to agree."""
    data = packed[0].read_bytes()
    build, _ = corpus.CASES[name]
    path = tmp_path / "case.repro.zip"
    path.write_bytes(build(data, read_members(packed[0])))
    try:
        ours = _reprokit_view(path)
    except ArchiveError:
        return  # refused: nothing to disagree about
    assert ours == _zipfile_view(path), name
    assert ours == _unzip_view(path, tmp_path), name


@needs_unzip
def test_the_readers_really_disagree_on_the_corpus(packed, tmp_path):
    """The corpus is not vacuous: without reprokit's refusal, unzip and zipfile would differ."""
    data = packed[0].read_bytes()
    members = read_members(packed[0])
    for name in ("zip-unicode-path-renames", "zip-comment-holds-second-archive"):
        build, _ = corpus.CASES[name]
        path = tmp_path / f"{name}.zip"
        path.write_bytes(build(data, members))
        assert _zipfile_view(path) != _unzip_view(path, tmp_path) or name.startswith(
            "zip-comment"
        ), name
    renamed = tmp_path / "zip-unicode-path-renames.zip"
    assert "evil.py" in _unzip_view(renamed, tmp_path)
    assert "evil.py" not in _zipfile_view(renamed)
