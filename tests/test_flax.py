"""Flax models through penzai's unflaxify bridge: pack here, replay in fresh interpreters.

Real flax (the `reprokit[flax]` extra), real subprocesses. The models are in
`tests/flax_models.py`, which plays the reporter's own module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

flax = pytest.importorskip("flax")

import flax_models  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import run_json, run_python, run_reprokit, subprocess_env  # noqa: E402
from penzai import pz  # noqa: E402

import reprokit  # noqa: E402
from reprokit.record import _flax  # noqa: E402

BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name.split(".")[0])
sys.meta_path.insert(0, _Block())
"""


def _blocked(*modules: str) -> str:
    return BLOCK.format(blocked=set(modules))


def _replay_script(folder, *args: str, blocked: tuple[str, ...]):
    script = folder / "replay.py"
    code = _blocked(*blocked) + f"""
import runpy
sys.argv = [{str(script)!r}, *{list(args)!r}]
try:
    runpy.run_path({str(script)!r}, run_name="__main__")
except SystemExit as exit:
    sys.exit(exit.code)
"""
    return run_python(code)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """The LayerNorm of a small Flax encoder, packed with no allow_modules at all."""
    _, argument, selection = flax_models.encoder_call()
    path = tmp_path_factory.mktemp("flax") / "layernorm.repro.zip"
    result = reprokit.pack(selection, argument, signature="output", out=path)
    return path, result


@pytest.fixture(scope="module")
def train_step(tmp_path_factory):
    model, argument, side_inputs = flax_models.train_step_call()
    path = tmp_path_factory.mktemp("flax") / "train.repro.zip"
    reprokit.pack(pz.select(model), argument, side_inputs=side_inputs, out=path, check=False)
    return path


def test_layernorm_packs_and_replays_bitwise_from_another_folder(encoder, tmp_path):
    path, result = encoder
    assert result.self_check["reproduced"] and result.self_check["output_bitwise_equal"]
    assert "LayerNorm_0" in result.keypath
    elsewhere = tmp_path / "maintainer"
    elsewhere.mkdir()
    copy = elsewhere / "layernorm.repro.zip"
    copy.write_bytes(path.read_bytes())
    code, verdict = run_json("run", copy.name, cwd=elsewhere)
    assert code == 0 and verdict["reproduced"] and verdict["output_bitwise_equal"]
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        requirements = archive.read("requirements.txt").decode()
    assert manifest["modules"] == []  # nothing for the maintainer to allow
    assert f"flax=={flax.__version__}" in requirements.split()


def test_reference_float64_shows_the_layernorm_error(encoder):
    code, verdict = run_json("run", encoder[0], "--reference", "float64")
    assert code == 0
    (leaf,) = verdict["reference"]["leaves"]
    assert leaf["recorded_max_abs_error"] > 1.0  # float32 cancels in E[x^2] - E[x]^2


def test_replay_py_reproduces_without_reprokit(encoder, tmp_path):
    zipfile.ZipFile(encoder[0]).extractall(tmp_path)
    result = _replay_script(tmp_path, "--json", blocked=("reprokit",))
    assert result.returncode == 0, result.stderr[-3000:]
    verdict = json.loads(result.stdout)
    assert verdict["reproduced"] is True
    assert all(leaf["bitwise_equal"] for leaf in verdict["output"])
    source = (tmp_path / "replay.py").read_text()
    assert "flax.linen.normalization.LayerNorm" in source


def test_without_flax_run_and_replay_py_exit_5_saying_what_to_install(encoder, tmp_path):
    code = _blocked("flax") + f"""
import runpy
sys.argv = ["reprokit", "run", {str(encoder[0])!r}]
runpy.run_module("reprokit", run_name="__main__")
"""
    result = run_python(code)
    assert result.returncode == 5, result.stderr[-2000:]
    assert f"needs flax {flax.__version__}" in result.stderr
    assert "pip install 'reprokit[flax]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    zipfile.ZipFile(encoder[0]).extractall(tmp_path)
    script = _replay_script(tmp_path, blocked=("flax", "reprokit"))
    assert script.returncode == 5
    assert f"flax=={flax.__version__}" in script.stderr


def test_batchnorm_training_and_dropout_replay_bitwise_with_final_state(train_step, tmp_path):
    zipfile.ZipFile(train_step).extractall(tmp_path)
    script = _replay_script(tmp_path, "--json", blocked=("reprokit",))
    assert script.returncode == 0, script.stderr[-3000:]
    assert all(leaf["bitwise_equal"] for leaf in json.loads(script.stdout)["state"])
    assert "rng_names=frozenset({'dropout'})" in (tmp_path / "replay.py").read_text()
    code, verdict = run_json("run", train_step)
    assert code == 0, verdict
    assert verdict["output_bitwise_equal"] and verdict["state_bitwise_equal"]
    # batch_stats mean and var, and the dropout stream's offset.
    assert len(verdict["state"]) >= 3
    loaded = reprokit.load(train_step)
    before = jax.tree_util.tree_leaves(loaded.record["initial_var_values"])
    after = jax.tree_util.tree_leaves(loaded.record["final_var_values"])
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(before, after, strict=True)
        if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
    )


def test_user_flax_module_replays_with_allow_module(tmp_path):
    model, argument = flax_models.scaled_call()
    path = tmp_path / "scaled.repro.zip"
    reprokit.pack(pz.select(model), argument, out=path, check=False)
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("manifest.json"))["modules"] == ["flax_models"]
    refused = run_reprokit("run", path)
    assert refused.returncode == 3 and "--allow-module flax_models" in refused.stderr
    code, verdict = run_json("run", path, "--allow-module", "flax_models")
    assert code == 0 and verdict["output_bitwise_equal"]


MAIN_SCRIPT = '''"""A reporter's script: the Flax layer is defined right here, in __main__."""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from penzai import pz
from penzai.toolshed import unflaxify


class Scaled(nn.Module):
    width: int = 3

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.constant(1.5), (self.width,))
        return jnp.tanh(x * scale)


if __name__ == "__main__":
    import reprokit

    module = Scaled()
    x = jax.random.normal(jax.random.key(0), (2, 3))
    model = unflaxify.unflaxify_apply(module, module.init(jax.random.key(1), x), x)
    argument = unflaxify.ArgsAndKwargs.capture(x)
    result = reprokit.pack(pz.select(model), argument, out=sys.argv[1], bundle_code=True)
    print("SELF-CHECK:", result.self_check["reproduced"])
'''


def test_flax_module_in_main_replays_with_bundle_code(tmp_path):
    script = tmp_path / "reporter.py"
    script.write_text(MAIN_SCRIPT)
    out = tmp_path / "main.repro.zip"
    env = subprocess_env()
    env["PYTHONPATH"] = ""
    packed = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "SELF-CHECK: True" in packed.stdout
    script.unlink()
    assert run_reprokit("run", out, env=env).returncode == 3
    replayed = run_reprokit("run", out, "--trust-code", env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert "REPRODUCED" in replayed.stdout


def test_initializer_closures_are_recorded_as_their_factory_call():
    init = flax.linen.initializers.lecun_normal()
    factory, keywords = _flax.initializer_call(init)
    assert factory == "jax.nn.initializers:variance_scaling"
    assert keywords["mode"] == "fan_in" and keywords["scale"] == 1.0
    again = _flax.make_initializer(factory, keywords)
    key = jax.random.key(0)
    assert np.array_equal(init(key, (3, 4)), again(key, (3, 4)))
    assert _flax.initializer_call(lambda key, shape: None) is None
    with pytest.raises(reprokit.ArchiveError):
        _flax.make_initializer("jax.nn.initializers:zeros", {})


def test_find_names_the_layernorm_in_flax_terms_and_packs_it(tmp_path):
    model, argument, _ = flax_models.encoder_call()
    result = reprokit.search(model, argument, check="mismatch")
    assert "Encoder/LayerNorm_0" in result.report.splitlines()[2]  # the culprit line
    assert "flax Encoder/Dense_0" in result.report
    packed = result.pack(tmp_path / "found.repro.zip", check=False)
    with zipfile.ZipFile(packed.path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        script = archive.read("replay.py").decode()
    assert manifest["layer"]["flax_path"] == "Encoder/LayerNorm_0"
    assert "# Flax module:    Encoder/LayerNorm_0" in script
    described = run_reprokit("inspect", packed.path)
    assert "(Flax module Encoder/LayerNorm_0)" in described.stdout


TARGET = """
import flax_models

def make_call():
    model, argument, _ = flax_models.encoder_call()
    return model, argument
"""


def test_cli_lists_flax_paths_and_selects_by_them(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    listed = run_reprokit("pack", f"{tmp_path / 'target.py'}:make_call", "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {row.get("flax_path") for row in rows} >= {"Encoder", "Encoder/LayerNorm_0"}
    out = tmp_path / "selected.repro.zip"
    packed = run_reprokit(
        "pack", f"{tmp_path / 'target.py'}:make_call", "--select", "Encoder/LayerNorm_0",
        "--no-check", "-o", out,
    )
    assert packed.returncode == 0, packed.stderr
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["layer"]["flax_path"] == "Encoder/LayerNorm_0"


def test_flax_layernorm_example_finds_packs_and_replays(tmp_path):
    from conftest import REPO

    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "flax_layernorm.py")],
        capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "flax Encoder/LayerNorm_0" in done.stdout and "<== CULPRIT" in done.stdout
    assert "replayed: reproduced" in done.stdout
    code, verdict = run_json(
        "run", tmp_path / "flax-layernorm.repro.zip", "--reference", "float64", cwd=tmp_path
    )
    assert code == 0 and verdict["reference"]["leaves"][0]["recorded_max_rel_error"] > 0.01


def test_without_flax_penzai_models_pack_and_replay_as_before(tmp_path):
    out = tmp_path / "mlp.repro.zip"
    code = _blocked("flax") + f"""
import jax, reprokit
from penzai import pz
from penzai.models import simple_mlp
mlp = simple_mlp.MLP.from_config(name="m", init_base_rng=jax.random.key(0), feature_sizes=[3, 4])
x = pz.nx.wrap(jax.numpy.ones((2, 3)), "batch", "features")
reprokit.pack(pz.select(mlp), x, out={str(out)!r}, check=False, quiet=True)
print(reprokit.replay({str(out)!r}).reproduced, "flax" in sys.modules)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("variant", [("--stablehlo",), ("--repeat", "2")])
def test_layernorm_replays_under_run_variants(encoder, variant):
    result = run_reprokit("run", encoder[0], *variant)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REPRODUCED" in result.stdout
