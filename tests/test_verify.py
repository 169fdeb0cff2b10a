"""`reprokit verify`, and format versioning: v1 archives load forever, newer ones say upgrade.

verify must check everything it can without importing jax, penzai or any
module an archive names; the checked-in v1 archive (tests/data) must keep
loading and replaying in every future reprokit, and an archive from a newer
format must say to upgrade rather than fail on some field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgpack
import pytest
from conftest import run_python, run_reprokit
from fuzzer import read_members, replace_member, write_members

import reprokit
from reprokit import ArchiveError
from reprokit.archive._verify import verify_archive

DATA = Path(__file__).resolve().parent / "data"
V1 = DATA / "v1-linear.repro.zip"
# The v1 archive must never change: this pin catches a silent regeneration.
V1_SHA256 = "8339a538a8cfe49c53a6a3d53baa5576ba4ec3b006b55601e12366174e08d498"

_VERIFY_WITHOUT_JAX = """
import json, sys
from reprokit._cli import main
try:
    main(["verify", *sys.argv[1:]], prog_name="reprokit")
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("jax", "jaxlib", "penzai", "custom_layers") if m in sys.modules)
print(json.dumps({"code": code, "imported": heavy}), file=sys.stderr)
"""


def _verify_in_fresh_process(*args: str) -> tuple[dict, str]:
    code = _VERIFY_WITHOUT_JAX.replace("sys.argv[1:]", repr(list(args)))
    done = run_python(code, timeout=60)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report, done.stdout


def test_v1_archive_is_unchanged():
    assert hashlib.sha256(V1.read_bytes()).hexdigest() == V1_SHA256


def test_verify_imports_no_jax_and_prints_the_sha256():
    report, stdout = _verify_in_fresh_process(str(V1))
    assert report == {"code": 0, "imported": []}
    assert f"sha256: {V1_SHA256}" in stdout
    assert "valid reprokit archive" in stdout


def test_verify_refuses_without_importing_jax(tmp_path):
    members = read_members(V1)
    manifest = json.loads(next(m.data for m in members if m.name == "manifest.json"))
    manifest["format_version"] = 2
    newer = tmp_path / "v2.repro.zip"
    write_members(replace_member(members, "manifest.json", json.dumps(manifest).encode()), newer)
    done = run_python(_VERIFY_WITHOUT_JAX.replace("sys.argv[1:]", repr([str(newer)])), timeout=60)
    lines = done.stderr.strip().splitlines()
    assert json.loads(lines[-1]) == {"code": 3, "imported": []}
    assert lines[0].startswith("reprokit: error: archive uses format version 2")
    assert "upgrade reprokit" in lines[0]


def test_verify_json_and_python_api():
    report = verify_archive(V1)
    assert report.sha256 == V1_SHA256
    assert report.format_version == 1 and report.arrays == 3 and report.modules == ()
    done = run_reprokit("verify", "--json", V1, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha256"] == V1_SHA256


def test_verify_checks_user_modules_by_name_without_importing_them(tmp_path):
    """An archive needing the maintainer's own module: refused unless allowed, never imported."""
    members = read_members(V1)
    structure_name = "structure.msgpack"
    structure = msgpack.unpackb(next(m.data for m in members if m.name == structure_name))
    structure["record"]["side_inputs"]["v"].append(
        ["scale", {"$t": "fn", "name": "custom_layers:soft_clip"}]
    )
    manifest = json.loads(next(m.data for m in members if m.name == "manifest.json"))
    manifest["modules"] = ["custom_layers"]
    changed = replace_member(members, structure_name, msgpack.packb(structure))
    changed = replace_member(changed, "manifest.json", json.dumps(manifest).encode())
    path = tmp_path / "custom.repro.zip"
    write_members(changed, path)

    refused, _ = _verify_in_fresh_process(str(path))
    assert refused == {"code": 3, "imported": []}
    allowed, stdout = _verify_in_fresh_process("--allow-module", "custom_layers", str(path))
    assert allowed == {"code": 0, "imported": []}, stdout
    assert "needs your modules: custom_layers" in stdout


def test_the_v1_archive_loads_and_replays_forever():
    loaded = reprokit.load(V1)
    assert type(loaded.submodel).__name__ == "Linear"
    assert loaded.manifest["format_version"] == 1
    assert loaded.record["argument"].data_array.shape == (3, 4)
    verdict = reprokit.replay(V1)
    # Bitwise on the jax that made it; a later jax may round differently,
    # but the replay must run and stay close.
    leaf = verdict.details["output"][0]
    assert leaf["path"] == "output.data_array"
    assert verdict.reproduced or (leaf.get("max_abs_error") or 0) < 1e-5


def test_a_newer_format_says_upgrade(tmp_path):
    members = read_members(V1)
    manifest = json.loads(next(m.data for m in members if m.name == "manifest.json"))
    manifest.update(format_version=2, reprokit_version="9.0.0", some_new_field={"x": 1})
    # A newer format may change anything else too; the version is read first.
    del manifest["signature"]
    path = tmp_path / "v2.repro.zip"
    write_members(replace_member(members, "manifest.json", json.dumps(manifest).encode()), path)
    with pytest.raises(ArchiveError, match=r"upgrade reprokit to 9\.0\.0 or later"):
        reprokit.load(path)
    with pytest.raises(ArchiveError, match="upgrade reprokit"):
        verify_archive(path)


def test_limits_can_be_raised_from_the_api():
    from reprokit.archive._container import Limits

    with pytest.raises(ArchiveError, match="limit is 2"):
        verify_archive(V1, limits=Limits(max_members=2))
    assert verify_archive(V1, limits=Limits(max_members=10)).sha256 == V1_SHA256
