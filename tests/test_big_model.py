"""Big models: packing one layer materialises that layer's arrays, never the rest of the model.

The model holds two large unselected layers (512 MiB of parameters) around
a small selected one. A fresh interpreter builds and runs the model, then
packs the small layer; its peak RSS (`resource.getrusage`) must stay within
a small margin of what the model itself already occupied. A pack that
copied, gathered or serialised the whole model would add at least one
large layer (256 MiB) to the peak.
"""

from __future__ import annotations

import json

from conftest import run_python

_BIG = 8192  # an 8192 x 8192 float32 matrix: 256 MiB per large layer

CODE = f"""
import json, resource, time
import jax, jax.numpy as jnp
from penzai import pz
import reprokit

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def current_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

def linear(rows, cols, name, big):
    if big:
        weights = jnp.full((rows, cols), 1e-3, jnp.float32)  # written on the device, no host copy
    else:
        weights = jax.random.normal(jax.random.key(rows + cols), (rows, cols))
    return pz.nn.Linear(
        weights=pz.Parameter(value=pz.nx.wrap(weights, "features", "features_out"), label=name),
        in_axis_names=("features",),
        out_axis_names=("features_out",),
    )

def rename():
    return pz.nn.RenameAxes(old="features_out", new="features")

N = {_BIG}
model = pz.nn.Sequential([
    linear(16, N, "in", False), rename(),
    linear(N, N, "big1", True), rename(),
    linear(N, 16, "selected", False), rename(),
    linear(16, N, "out", False), rename(),
    linear(N, N, "big2", True), rename(),
])
x = pz.nx.wrap(jnp.ones((2, 16)), "batch", "features")
model(x).data_array.block_until_ready()  # every page of the model is now resident
before = max(current_mib(), peak_mib())
selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(2)
started = time.perf_counter()
result = reprokit.pack(selection, x, out="big.repro.zip", check=False)
print(json.dumps(dict(
    before_mib=before,
    peak_mib=peak_mib(),
    seconds=time.perf_counter() - started,
    array_bytes=result.array_bytes,
    size=result.size,
    parameters=result.contents["parameter_values"],
)))
"""


def test_packing_a_small_layer_of_a_big_model_materialises_only_that_layer(tmp_path):
    result = run_python(CODE, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    big_layer_mib = _BIG * _BIG * 4 / 2**20
    assert report["before_mib"] > 2 * big_layer_mib  # the big layers really were resident
    # The selected layer's weights (N x 16), its input and its output: about 0.5 MiB.
    assert report["parameters"] == _BIG * 16
    assert report["array_bytes"] < 2**20 and report["size"] < 2 * 2**20
    grown = report["peak_mib"] - report["before_mib"]
    assert grown < big_layer_mib / 4, report
