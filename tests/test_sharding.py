"""Sharded captures: 8 simulated CPU devices at pack time, replay on 8, on 1, and on a named mesh.

Device counts are fixed when jax starts, so every capture and replay runs in
a fresh interpreter with `XLA_FLAGS=--xla_force_host_platform_device_count`
set before jax is imported (conftest's helpers pass the environment).
"""

from __future__ import annotations

import json

import pytest
from conftest import run_python, run_reprokit, subprocess_env

from reprokit._errors import UsageError
from reprokit.portable._arrays import check_descriptor, check_sharding
from reprokit.replaying._sharding import MeshRequest, describe_topology, parse_mesh, recorded_meshes

EIGHT = "--xla_force_host_platform_device_count=8"

# A penzai MLP whose parameters are sharded over a 2 x 4 mesh (Auto axes:
# penzai's named-axis vmaps need them), fed an input sharded over "data".
SHARDED_MODEL = """
import jax, jax.numpy as jnp
from jax.sharding import AxisType
from penzai import pz
from penzai.models import simple_mlp
from penzai.toolshed import sharding_util

mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
model = simple_mlp.MLP.from_config(
    name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[8, 16, 16, 8]
)
for param in pz.select(model).at_instances_of(pz.Parameter).get_sequence():
    param.value = sharding_util.name_to_name_device_put(param.value, mesh, {"features_out": "model"})
x = sharding_util.name_to_name_device_put(
    pz.nx.wrap(jnp.linspace(-1.0, 1.0, 32).reshape(4, 8), "batch", "features"), mesh, {"batch": "data"}
)
selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(1)
"""


def _good_sharding() -> dict:
    return {
        "mesh_shape": [2, 4],
        "axis_names": ["data", "model"],
        "axis_types": ["Auto", "Explicit"],
        "spec": [None, ["data", "model"]],
        "device_count": 8,
        "device_ids": list(range(8)),
    }


def test_sharding_descriptors_are_checked():
    check_sharding(_good_sharding(), 2)
    desc = {"kind": "jax", "dtype": "float32", "shape": [4, 8], "nbytes": 128}
    assert check_descriptor(desc) == 128  # old descriptors (no sharding) stay valid
    assert check_descriptor({**desc, "sharding": _good_sharding()}) == 128
    bad = [
        ({"mesh_shape": [2, 3]}, "device count"),
        ({"spec": [None, "expert"]}, "axis the mesh does not have"),
        ({"spec": ["data", "data"]}, "twice"),
        ({"spec": [None, None, None]}, "at most one entry"),
        ({"axis_types": ["Auto", "Magic"]}, "Auto, Explicit or Manual"),
        ({"axis_names": ["data", "data"]}, "distinct"),
        ({"axis_names": ["data", "os.system"]}, "identifiers"),
        ({"device_ids": [0] * 8}, "distinct device numbers"),
        ({"device_count": True}, "device count"),
        ({"evil": 1}, "expected fields"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            check_sharding({**_good_sharding(), **change}, 2)
    with pytest.raises(ValueError, match="expected fields"):
        check_sharding([], 2)
    with pytest.raises(ValueError, match="checkpoint key"):
        check_descriptor({**desc, "checkpoint": "../x"})


def test_mesh_option_parsing_and_topology_lines():
    assert parse_mesh(None) == MeshRequest()
    assert parse_mesh("1").kind == "single"
    assert parse_mesh("recorded").kind == "recorded"
    assert parse_mesh("data=2, model=4").axes == (("data", 2), ("model", 4))
    for text in ("data=0", "data", "2x4", "data=2,data=2", "os.path=1"):
        with pytest.raises(UsageError):
            parse_mesh(text)
    meshes = recorded_meshes([{"sharding": _good_sharding()}, {}, {"sharding": _good_sharding()}])
    assert meshes == [
        {
            "mesh": {"data": 2, "model": 4},
            "axis_types": ["Auto", "Explicit"],
            "device_count": 8,
            "arrays": 2,
        }
    ]
    assert describe_topology(None) is None
    line = describe_topology(
        {
            "used": "single",
            "mesh": None,
            "device_count": 1,
            "platform": "cpu",
            "recorded": meshes,
            "reason": "--mesh 1",
        }
    )
    assert line == "one cpu device; recorded on data=2 x model=4 (8 devices) (--mesh 1)"


@pytest.fixture(scope="module")
def sharded_archives(tmp_path_factory):
    """An eager and a jit capture of a Linear whose weights are sharded over 8 devices."""
    folder = tmp_path_factory.mktemp("sharded")
    code = (
        SHARDED_MODEL
        + f"""
import json, numpy as np, reprokit
from reprokit.portable._arrays import describe, rebuild
paths = {{}}
for mode in ("eager", "jit"):
    path = {str(folder)!r} + f"/{{mode}}.repro.zip"
    reprokit.pack(selection, x, out=path, mode=mode, check=False)
    paths[mode] = path
# A typed PRNG key sharded over the mesh survives describe/rebuild with its sharding.
keys = jax.device_put(
    jax.random.split(jax.random.key(0), 8),
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model")),
)
desc, data = describe(keys)
from reprokit.portable._arrays import named_sharding
back = rebuild(desc, np.frombuffer(data.tobytes(), np.uint8).copy(), named_sharding(desc["sharding"]))
# Explicit axes (jax.make_mesh's default) are recorded and rebuilt as such.
explicit_mesh = jax.make_mesh((2, 4), ("data", "model"))
explicit = jax.device_put(
    np.arange(32.0, dtype=np.float32).reshape(8, 4),
    jax.sharding.NamedSharding(explicit_mesh, jax.sharding.PartitionSpec("data")),
)
edesc, edata = describe(explicit)
eback = rebuild(edesc, np.frombuffer(edata.tobytes(), np.uint8).copy(), named_sharding(edesc["sharding"]))
print(json.dumps(dict(
    paths=paths,
    devices=jax.device_count(),
    key_spec=str(back.sharding.spec),
    key_equal=bool((jax.random.key_data(back) == jax.random.key_data(keys)).all()),
    explicit_types=edesc["sharding"]["axis_types"],
    explicit_back=[t.name for t in eback.sharding.mesh.axis_types],
    explicit_equal=bool((eback == explicit).all()) and eback.sharding == explicit.sharding,
)))
"""
    )
    result = run_python(code, env=subprocess_env(XLA_FLAGS=EIGHT), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_capture_records_each_arrays_sharding(sharded_archives):
    assert sharded_archives["devices"] == 8
    assert sharded_archives["key_equal"] and "model" in sharded_archives["key_spec"]
    assert sharded_archives["explicit_types"] == ["Explicit", "Explicit"]
    assert sharded_archives["explicit_back"] == ["Explicit", "Explicit"]
    assert sharded_archives["explicit_equal"]
    result = run_reprokit("inspect", sharded_archives["paths"]["eager"], "--json")
    assert result.returncode == 0, result.stderr
    arrays = json.loads(result.stdout)["arrays"]
    weights = arrays[0]["sharding"]
    assert weights["mesh_shape"] == [2, 4] and weights["axis_names"] == ["data", "model"]
    assert weights["axis_types"] == ["Auto", "Auto"] and weights["device_count"] == 8
    assert weights["spec"] == [None, "model"]
    assert all("sharding" in desc for desc in arrays)  # input and output are sharded too
    text = run_reprokit("inspect", sharded_archives["paths"]["eager"]).stdout
    assert "sharded: 3 arrays over mesh data=2 x model=4 (8 devices" in text


def test_replays_bitwise_on_eight_devices_with_the_recorded_sharding(sharded_archives):
    code = f"""
import json, jax, reprokit
out = {{}}
for mode, path in {sharded_archives["paths"]!r}.items():
    loaded = reprokit.load(path)
    verdict = reprokit.replaying._replay.replay_loaded(loaded)
    weights = loaded.record["submodel"].weights.value.data_array
    out[mode] = dict(
        reproduced=verdict.reproduced,
        bitwise=verdict.details["output_bitwise_equal"],
        topology=verdict.topology,
        text=verdict.format(),
        spec=list(weights.sharding.spec),
        mesh=dict(weights.sharding.mesh.shape),
    )
try:
    reprokit.load({sharded_archives["paths"]["eager"]!r}, mesh="data=3,model=1")
except reprokit.ReprokitError as error:
    out["uneven"] = [type(error).__name__, error.exit_code, str(error)]
print(json.dumps(out))
"""
    result = run_python(code, env=subprocess_env(XLA_FLAGS=EIGHT), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    kind, exit_code, message = report.pop("uneven")
    assert kind == "ReplayError" and exit_code == 5 and "do not split evenly" in message
    for mode, row in report.items():
        assert row["reproduced"] and row["bitwise"], (mode, row)
        assert row["topology"]["used"] == "recorded" and row["topology"]["device_count"] == 8
        assert row["spec"] == [None, "model"]
        assert row["mesh"] == {"data": 2, "model": 4}
        assert "topology: recorded mesh data=2 x model=4 restored on 8 cpu devices" in row["text"]


def test_replays_bitwise_on_one_device(sharded_archives):
    # No XLA_FLAGS: this interpreter has one CPU device, so `auto` falls back.
    code = f"""
import json, jax, reprokit
assert jax.device_count() == 1
out = {{}}
for mode, path in {sharded_archives["paths"]!r}.items():
    verdict = reprokit.replay(path)
    out[mode] = dict(
        reproduced=verdict.reproduced,
        bitwise=verdict.details["output_bitwise_equal"],
        topology=verdict.topology,
    )
try:
    reprokit.load({sharded_archives["paths"]["eager"]!r}, mesh="recorded")
    out["recorded"] = "loaded"
except reprokit.ReprokitError as error:
    out["recorded"] = [type(error).__name__, str(error)]
print(json.dumps(out))
"""
    env = subprocess_env()
    env.pop("XLA_FLAGS", None)
    result = run_python(code, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for mode in ("eager", "jit"):
        row = report[mode]
        assert row["reproduced"] and row["bitwise"], (mode, row)
        assert row["topology"]["used"] == "single" and row["topology"]["available_devices"] == 1
        assert "needs 8 devices" in row["topology"]["reason"]
    kind, message = report["recorded"]
    assert kind == "ReplayError" and "--mesh 1" in message


def test_cli_names_the_topology_for_one_device_and_a_named_mesh(sharded_archives):
    path = sharded_archives["paths"]["eager"]
    one = run_reprokit("run", path, "--mesh", "1")
    assert one.returncode == 0, one.stderr
    assert (
        "topology: one cpu device; recorded on data=2 x model=4 (8 devices) (--mesh 1)"
        in one.stdout
    )
    named = run_reprokit("run", path, "--mesh", "data=1,model=2", "--json")
    assert named.returncode == 0, named.stderr
    verdict = json.loads(named.stdout)
    assert verdict["output_bitwise_equal"]
    assert verdict["topology"]["used"] == "named"
    assert verdict["topology"]["mesh"] == {"data": 1, "model": 2}
