"""Arrays that repeat one element (all NaN, all zeros) are stored as a descriptor, not bytes.

A NaN report is about exactly such arrays, and deflate cannot shrink them past
the reader's zip-bomb ratio: without fills, `--max-size` had to refuse.
"""

from __future__ import annotations

import json
import zipfile

import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from conftest import run_json, run_python, run_reprokit
from penzai import pz

import reprokit
from reprokit.portable._arrays import check_descriptor, filled, repeated_element
from reprokit.views._inspect import fill_statistics

SIDE = 256  # 256 x 256 float32: 256 KiB, over the size from which fills are used


def _log_layer_archive(path, argument) -> reprokit.PackResult:
    # log(-1) is NaN everywhere: the recorded output is a big all-NaN array.
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.log)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    return reprokit.pack(selection, argument, out=path)


def _descriptors(path) -> list[dict]:
    with zipfile.ZipFile(path) as archive:
        return msgpack.unpackb(archive.read("structure.msgpack"), raw=False)["arrays"]


@pytest.fixture(scope="module")
def nan_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("fills") / "nan.repro.zip"
    argument = pz.nx.wrap(jnp.full((SIDE, SIDE), -1.0), "batch", "features")
    result = _log_layer_archive(path, argument)
    return path, result


def test_all_nan_output_and_constant_input_take_no_payload(nan_archive):
    path, result = nan_archive
    assert result.self_check["reproduced"]
    assert path.stat().st_size < 64 * 2**10  # the two arrays alone are 512 KiB
    assert result.filled_arrays == 2
    assert "arrays: 2 (512.0 KiB), 2 of them one value repeated" in result.summary()
    descriptors = _descriptors(path)
    fills = {desc.get("fill") for desc in descriptors}
    assert fills == {"repeat"}, descriptors
    argument, output = descriptors
    assert argument["element"] == np.float32(-1.0).tobytes().hex()
    assert np.isnan(np.frombuffer(bytes.fromhex(output["element"]), np.float32)).all()
    with zipfile.ZipFile(path) as archive:
        assert not [name for name in archive.namelist() if name.startswith("arrays/")]


def test_run_reproduces_a_filled_archive_bitwise(nan_archive):
    path, _ = nan_archive
    code, verdict = run_json("run", path)
    assert code == 0 and verdict["reproduced"] and verdict["output_bitwise_equal"], verdict


def test_standalone_script_rebuilds_filled_arrays(nan_archive, tmp_path):
    path, _ = nan_archive
    zipfile.ZipFile(path).extractall(tmp_path / "r")
    result = run_python(
        f"import runpy, sys; sys.argv = ['replay.py', '--json']\n"
        f"runpy.run_path({str(tmp_path / 'r' / 'replay.py')!r}, run_name='__main__')"
    )
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["reproduced"] and verdict["output_bitwise_equal"], verdict


def test_inspect_counts_the_nans_of_a_fill_without_a_payload(nan_archive):
    path, _ = nan_archive
    code, report = run_json("inspect", path)
    assert code == 0
    rows = {row["where"]: row for row in report["statistics"]}
    output = rows["output.data_array"]
    assert output["fill"] == "repeat" and output["nan"] == SIDE * SIDE
    assert output["min"] is None and output["shape"] == [SIDE, SIDE]
    argument = rows["argument.data_array"]
    assert argument["min"] == argument["max"] == argument["mean"] == -1.0
    text = run_reprokit("inspect", path)
    assert text.returncode == 0 and f"float32[{SIDE},{SIDE}] (repeat)" in text.stdout
    assert "arrays: 2 (512.0 KiB), 2 stored as fills" in text.stdout


def test_max_size_fits_a_nan_array_deflate_could_not(tmp_path):
    # 8 MiB of NaN, in and out: deflated past 200:1 the reader would take it
    # for a zip bomb, so stored it would be 16 MiB.
    argument = pz.nx.wrap(jnp.full((2048, 1024), jnp.nan), "batch", "features")
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.exp)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    result = reprokit.pack(selection, argument, out=tmp_path / "fit.repro.zip", max_size="1MB")
    assert result.size < 64 * 2**10 and result.self_check["reproduced"]


def test_small_constant_arrays_keep_their_bytes(tmp_path):
    path = tmp_path / "small.repro.zip"
    _log_layer_archive(path, pz.nx.wrap(jnp.full((4, 4), -1.0), "batch", "features"))
    assert all("fill" not in desc for desc in _descriptors(path))


@pytest.mark.parametrize(
    "values",
    [
        np.full((3, 5), np.nan, np.float32),
        np.full((7,), -0.0, np.float64),
        np.full((2, 3), 3, np.int8),
        np.full((4,), True),
        np.full((2, 2), 1.5, ml_dtypes.bfloat16),
        np.full((3,), 2, ml_dtypes.int4),
        np.full((2,), 1 - 2j, np.complex64),
    ],
    ids=lambda values: values.dtype.name,
)
def test_repeated_element_round_trips_bitwise(values):
    element = repeated_element(values)
    assert element == values.reshape(-1)[:1].tobytes()
    desc = {
        "kind": "numpy",
        "dtype": values.dtype.name,
        "shape": list(values.shape),
        "nbytes": values.nbytes,
        "fill": "repeat",
        "element": element.hex(),
    }
    assert check_descriptor(desc) == values.nbytes
    raw = filled(desc)
    assert raw.ctypes.data % 64 == 0
    assert raw.tobytes() == values.tobytes()
    stats = fill_statistics(desc)
    assert stats["size"] == values.size and stats["fill"] == "repeat"


def test_repeated_element_tells_signed_zeros_and_nan_payloads_apart():
    assert repeated_element(np.array([0.0, -0.0], np.float32)) is None
    quiet, other = np.float32(np.nan), np.uint32(0x7FC00001).view(np.float32)
    assert repeated_element(np.array([quiet, other], np.float32)) is None
    # One differing element in the middle of a big array, past every probe.
    values = np.zeros(1_000_003, np.float32)
    values[500_001] = 1.0
    assert repeated_element(values) is None
    assert repeated_element(np.zeros((0, 4), np.float32)) is None

