"""Loading an archive holds its arrays once: extra memory at most ~1.1x the array bytes.

Issue 6 promises that reprokit never holds two copies of the arrays. The
loader reads each array member straight into a 64-byte-aligned buffer, which
`jax.device_put` aliases instead of copying; a reader that went through
`bytes`, `zipfile.read` or an unaligned buffer would peak at 2x. This test
packs a ~256 MiB penzai model (large float32 and bfloat16 matrices, small
biases, a typed PRNG key) in one fresh interpreter, then loads it in another
and measures, around `reprokit.load` only:

* the peak of the resident set above what it was before the load (the
  kernel's high-water mark, reset through /proc/self/clear_refs; where that
  cannot be written, `resource.getrusage`'s ru_maxrss in that same fresh
  process, an upper bound);
* the peak of Python-visible allocations (`tracemalloc`, which sees numpy's
  buffers but not XLA's).

Not timed: only memory is asserted (timings are in `benchmarks/`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import subprocess_env

_BUILD = r"""
import json, math, sys
import jax, jax.numpy as jnp, ml_dtypes, numpy as np
from penzai import pz
import reprokit

TOTAL = 256 * 2**20
d = int(math.sqrt(TOTAL / 14)) // 8 * 8  # 3 float32 + 1 bfloat16 d x d matrices
rng = np.random.default_rng(0)
block = rng.standard_normal(2**20, dtype=np.float32)

def noise(count, dtype, scale):
    out = np.empty(count, dtype)
    for start in range(0, count, block.size):
        part = out[start : start + block.size]
        part[:] = (block[: part.size] * scale).astype(dtype)
    return out

def param(values, names, label):
    return pz.Parameter(value=pz.nx.wrap(jax.device_put(values), *names), label=label)

layers, axes = [], ("a", "b")
for i in range(4):
    dtype = ml_dtypes.bfloat16 if i == 3 else np.float32
    src, dst = axes[i % 2], axes[(i + 1) % 2]
    layers.append(pz.nn.Linear(
        weights=param(noise(d * d, dtype, 1 / math.sqrt(d)).reshape(d, d), (src, dst), f"w{i}"),
        in_axis_names=(src,), out_axis_names=(dst,)))
    for j in range(12):
        bias_dtype = ml_dtypes.bfloat16 if j % 4 == 3 else np.float32
        layers.append(pz.nn.AddBias(
            bias=param(noise(d, bias_dtype, 0.01), (dst,), f"b{i}_{j}"), new_axis_names=()))
layers.append(pz.nn.StochasticDropout(drop_rate=0.1, share_across_axes=()))
model = pz.nn.Sequential(layers)
x = pz.nx.wrap(jnp.asarray(noise(2 * d, np.float32, 1.0).reshape(2, d)), "batch", "a")
side = {"random_stream": pz.RandomStream.from_base_key(jax.random.key(0))}
big = reprokit.pack(pz.select(model).at_keypaths([()]), x, side_inputs=side,
                    out=sys.argv[1], check=False)
tiny = reprokit.pack(pz.select(model).at_instances_of(pz.nn.AddBias).pick_nth_selected(0),
                     x, side_inputs=side, out=sys.argv[2], check=False)
print(json.dumps({"array_bytes": big.array_bytes, "arrays": big.array_count}))
"""

_MEASURE = r"""
import gc, json, os, resource, sys, tracemalloc
import jax, numpy as np
from penzai import pz
import reprokit

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def vm_hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

# Lazy imports, the XLA client and the first device_put happen here, not in the measured load.
reprokit.load(sys.argv[2])
jax.block_until_ready(jax.device_put(np.ones(16)))
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    method = "VmHWM"
except OSError:
    method = "ru_maxrss"
before = rss()
tracemalloc.start()
loaded = reprokit.load(sys.argv[1])
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
if method == "VmHWM":
    peak = vm_hwm()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
leaves = jax.tree_util.tree_leaves(loaded.record)
print(json.dumps({
    "extra_rss": peak - before,
    "traced_peak": traced_peak,
    "method": method,
    "leaves": len(leaves),
}))
"""


def _run(code: str, *args: str, cwd) -> dict:
    """Runs `code` with `args` in a fresh interpreter; returns the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="measures RSS through /proc")
def test_load_holds_the_arrays_once(tmp_path):
    big, tiny = str(tmp_path / "big.repro.zip"), str(tmp_path / "tiny.repro.zip")
    array_bytes = _run(_BUILD, big, tiny, cwd=tmp_path)["array_bytes"]
    assert array_bytes > 240 * 2**20
    result = _run(_MEASURE, big, tiny, cwd=tmp_path)
    extra, traced = result["extra_rss"], result["traced_peak"]
    ratio = extra / array_bytes
    # The arrays themselves must be resident (else nothing was measured) ...
    assert ratio >= 0.9, f"only {ratio:.2f}x the array bytes became resident ({result})"
    # ... and only once: a second copy anywhere would push this to ~2x.
    assert ratio <= 1.1, (
        f"loading {array_bytes / 2**20:.0f} MiB of arrays raised peak RSS by "
        f"{extra / 2**20:.0f} MiB ({ratio:.2f}x; limit 1.1x; {result['method']})"
    )
    assert traced <= 1.1 * array_bytes, (
        f"Python-visible allocations peaked at {traced / array_bytes:.2f}x the array bytes"
    )
