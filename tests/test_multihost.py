"""Multi-process capture for real: two jax processes on loopback, replay in a third, single-device one.

The test starts both processes itself (`jax.distributed.initialize` on
127.0.0.1 with a free port, gloo CPU collectives, 4 simulated devices
each), bounds them with a timeout, and kills them if anything goes wrong.
Each process builds a penzai MLP whose parameters are sharded over the
8-device global mesh, so no process holds them whole, and packs one layer
twice: through orbax-checkpoint (the default) and with `gather=True`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import run_python, run_reprokit, subprocess_env

_TIMEOUT_S = 240

WORKER = """
import json, os, sys, time
process_id, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
)
import jax.numpy as jnp
from jax.sharding import AxisType
from penzai import pz
from penzai.models import simple_mlp
from penzai.toolshed import sharding_util
import reprokit

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
model = simple_mlp.MLP.from_config(
    name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[8, 16, 16, 8]
)
for param in pz.select(model).at_instances_of(pz.Parameter).get_sequence():
    param.value = sharding_util.name_to_name_device_put(param.value, mesh, {"features_out": "model"})
x = sharding_util.name_to_name_device_put(
    pz.nx.wrap(jnp.linspace(-1.0, 1.0, 32).reshape(4, 8), "batch", "features"), mesh, {"batch": "data"}
)
weights = pz.select(model).at_instances_of(pz.Parameter).get_sequence()[2].value.data_array
selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(1)
report = {"weights_fully_addressable": weights.is_fully_addressable}
for name, gather in (("orbax", False), ("gather", True)):
    started = time.perf_counter()
    result = reprokit.pack(
        selection, x, out=os.path.join(folder, name + ".repro.zip"), gather=gather, check=False
    )
    report[name] = {"seconds": round(time.perf_counter() - started, 3), "size": result.size}
print("REPORT " + json.dumps(report), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(folder) -> list[dict]:
    script = folder / "worker.py"
    script.write_text(WORKER)
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    logs = [open(folder / f"process{i}.log", "w+") for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(folder)],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = []
    for i, log in enumerate(logs):
        log.seek(0)
        text = log.read()
        log.close()
        assert processes[i].returncode == 0, f"process {i} failed:\n{text[-4000:]}"
        line = next(line for line in text.splitlines() if line.startswith("REPORT "))
        outputs.append(json.loads(line.removeprefix("REPORT ")))
    return outputs


@pytest.fixture(scope="module")
def two_process_archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    reports = _run_two_processes(folder)
    return folder, reports


def test_two_processes_pack_one_archive_through_orbax(two_process_archives):
    folder, reports = two_process_archives
    assert not reports[0]["weights_fully_addressable"]  # really not in one process
    assert reports[0]["orbax"]["size"] > 0 and reports[1]["orbax"]["size"] == 0
    path = folder / "orbax.repro.zip"
    assert not (folder / "orbax.repro.zip.shards").exists()  # scratch shards cleaned up
    # Process 0 writes the issue snippet beside the archive, as a one-process pack does.
    assert "orbax.repro.zip" in (folder / "orbax.issue.md").read_text()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("manifest.json"))
    assert "checkpoint/manifest.ocdbt" in names
    assert any(n.startswith("checkpoint/ocdbt.process_1/") for n in names)  # process 1's shards
    assert not any(n.startswith("arrays/") for n in names)
    section = manifest["multiprocess"]
    assert section["process_count"] == 2 and section["device_count"] == 8
    assert section["storage"] == "checkpoint" and section["checkpoint"]["arrays"] == 3
    # Only the selected layer's arrays: its weights, its input and its output.
    assert manifest["arrays"]["count"] == 3
    verified = run_reprokit("verify", path)
    assert verified.returncode == 0, verified.stderr


def test_replay_in_one_fresh_single_device_process_is_bitwise(two_process_archives):
    folder, reports = two_process_archives
    paths = {name: str(folder / f"{name}.repro.zip") for name in ("orbax", "gather")}
    code = f"""
import json, jax, reprokit
assert jax.process_count() == 1 and jax.device_count() == 1
out = {{}}
for name, path in {paths!r}.items():
    loaded = reprokit.load(path)
    verdict = reprokit.replaying._replay.replay_loaded(loaded)
    out[name] = dict(
        reproduced=verdict.reproduced,
        bitwise=verdict.details["output_bitwise_equal"],
        topology=verdict.topology["used"],
        text=verdict.format(),
        weights_devices=len(loaded.record["submodel"].weights.value.data_array.devices()),
    )
print(json.dumps(out))
"""
    env = subprocess_env()
    env.pop("XLA_FLAGS", None)
    result = run_python(code, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    replays = json.loads(result.stdout)
    for name, row in replays.items():
        assert row["reproduced"] and row["bitwise"], (name, row)
        assert row["topology"] == "single" and row["weights_devices"] == 1
        assert "recorded on data=2 x model=4 (8 devices)" in row["text"]
    # Both ways of storing, as measured in this run (printed with pytest -s).
    print(
        "multi-process pack, orbax: {:.2f} s, {} bytes; gather: {:.2f} s, {} bytes".format(
            reports[0]["orbax"]["seconds"],
            reports[0]["orbax"]["size"],
            reports[0]["gather"]["seconds"],
            reports[0]["gather"]["size"],
        )
    )


def test_gather_stores_ordinary_members(two_process_archives):
    folder, _ = two_process_archives
    with zipfile.ZipFile(folder / "gather.repro.zip") as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("manifest.json"))
    assert not any(n.startswith("checkpoint/") for n in names)
    assert manifest["multiprocess"]["storage"] == "gather"
    assert sum(n.startswith("arrays/") for n in names) == 3


def test_standalone_replay_script_reads_the_checkpoint(two_process_archives, tmp_path):
    folder, _ = two_process_archives
    with zipfile.ZipFile(folder / "orbax.repro.zip") as archive:
        archive.extractall(tmp_path)
    assert "tensorstore" in (tmp_path / "requirements.txt").read_text()
    env = subprocess_env()
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "replay.py"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=os.fspath(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["output_bitwise_equal"]
