"""Round trips on real penzai models: pack here, replay bitwise in fresh interpreters."""

from __future__ import annotations

import json
import re
import zipfile

import cases
import jax
import pytest
from conftest import run_json, run_python, subprocess_env

import reprokit
from reprokit.capture._capture import capture_calls, choose_call

ALLOW = ("custom_layers",)


def _no_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """name -> (archive path, treedef of the original record, PackResult)."""
    folder = tmp_path_factory.mktemp("archives")
    out = {}
    for name, (selection, argument, side_inputs) in cases.all_cases().items():
        path = folder / f"{name}.repro.zip"
        result = reprokit.pack(
            selection, argument, side_inputs=side_inputs, out=path, allow_modules=ALLOW
        )
        record = choose_call(capture_calls(selection, argument, side_inputs))
        original = {
            "submodel": record.submodel,
            "argument": record.argument,
            "side_inputs": record.side_inputs,
            "initial_var_values": record.initial_var_values,
            "output": record.output,
            "final_var_values": record.final_var_values,
        }
        out[name] = (path, str(jax.tree_util.tree_structure(original)), result)
    return out


def test_every_case_replays_bitwise_in_a_fresh_interpreter(packed):
    paths = {name: str(path) for name, (path, _, _) in packed.items()}
    code = f"""
import json, jax, reprokit
out = {{}}
for name, path in {paths!r}.items():
    loaded = reprokit.load(path, allow_modules={ALLOW!r})
    verdict = reprokit.replay(path, allow_modules={ALLOW!r})
    out[name] = dict(
        treedef=str(jax.tree_util.tree_structure(loaded.record)),
        reproduced=verdict.reproduced,
        output_bitwise=verdict.details["output_bitwise_equal"],
        state_bitwise=verdict.details["state_bitwise_equal"],
        state_leaves=len(verdict.details["state"]),
    )
print(json.dumps(out))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report) == set(packed)
    for name, (_, treedef, _) in packed.items():
        row = report[name]
        # Function reprs carry memory addresses, which differ between processes.
        assert _no_addresses(row["treedef"]) == _no_addresses(treedef), name
        assert row["reproduced"] and row["output_bitwise"] and row["state_bitwise"], (name, row)
    # The stateful cases really carry state through the archive.
    assert report["kv-cache"]["state_leaves"] > 0
    assert report["dropout"]["state_leaves"] > 0


def test_bf16_parameters_and_weak_types_survive(packed):
    path = packed["gemma-bf16-linear"][0]
    loaded = reprokit.load(path)
    dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(loaded.submodel)}
    assert "bfloat16" in dtypes
    drop = reprokit.load(packed["dropout"][0])
    rate = drop.submodel.drop_rate
    assert getattr(rate, "weak_type", False) or isinstance(rate, float)


@pytest.mark.parametrize("name", ["llama-attention", "kv-cache", "gemma-bf16-block"])
def test_reprokit_run_cli_reproduces(packed, name):
    code, verdict = run_json("run", packed[name][0])
    assert code == 0
    assert verdict["reproduced"] is True
    assert verdict["output_bitwise_equal"] is True


def test_custom_layer_needs_allow_module(packed):
    from conftest import run_reprokit

    path = packed["custom"][0]
    refused = run_reprokit("run", path)
    assert refused.returncode == 3
    assert "--allow-module custom_layers" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    code, verdict = run_json("run", path, "--allow-module", "custom_layers")
    assert code == 0 and verdict["output_bitwise_equal"]


BLOCK_REPROKIT = """
import importlib.abc, sys
class _NoReprokit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "reprokit" or name.startswith("reprokit."):
            raise ImportError("reprokit is not installed here")
sys.meta_path.insert(0, _NoReprokit())
"""


@pytest.mark.parametrize("name", ["dropout", "kv-cache", "gemma-bf16-attention", "custom"])
def test_standalone_script_gives_the_same_verdict_without_reprokit(packed, tmp_path, name):
    path = packed[name][0]
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(path).extractall(folder)
    script = folder / "replay.py"
    code = (
        BLOCK_REPROKIT
        + f"""
import runpy
sys.argv = [{str(script)!r}, "--json"]
try:
    runpy.run_path({str(script)!r}, run_name="__main__")
except SystemExit as exit:
    sys.exit(exit.code)
"""
    )
    result = run_python(code)
    assert "reprokit is not installed" not in result.stderr
    standalone = json.loads(result.stdout)
    _, verdict = run_json("run", path, "--allow-module", "custom_layers")
    assert result.returncode == 0
    assert standalone["reproduced"] == verdict["reproduced"] is True
    assert standalone["output"] == verdict["output"]
    assert standalone["state"] == verdict["state"]


@pytest.mark.parametrize("name", ["kv-cache", "gemma-bf16-block", "dropout"])
def test_standalone_script_rebuilds_the_same_objects_as_reprokit(packed, tmp_path, name):
    path = packed[name][0]
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(path).extractall(folder)
    code = f"""
import json, runpy, numpy as np, jax, reprokit
script = runpy.run_path({str(folder / "replay.py")!r}, run_name="replay")
script["restore_config"]()
theirs = script["build_record"]()
ours = reprokit.load({str(path)!r}).record
import re
# functools.partial compares by identity and reprs carry addresses: compare the spelled-out structure.
spelled = lambda tree: re.sub(r" at 0x[0-9a-f]+", "", str(jax.tree_util.tree_structure(tree)))
same_tree = spelled(theirs) == spelled(ours)
def same(a, b):
    if not hasattr(a, "dtype"):
        return type(a) is type(b) and a == b
    a_data = jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
    b_data = jax.random.key_data(b) if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key) else b
    return (a.dtype == b.dtype and getattr(a, "weak_type", None) == getattr(b, "weak_type", None)
            and np.asarray(a_data).tobytes() == np.asarray(b_data).tobytes())
leaves = [same(a, b) for a, b in zip(jax.tree_util.tree_leaves(theirs), jax.tree_util.tree_leaves(ours))]
print(json.dumps(dict(same_tree=same_tree, leaves=all(leaves), n=len(leaves))))
"""
    result = run_python(code, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["same_tree"] and report["leaves"] and report["n"] > 0
