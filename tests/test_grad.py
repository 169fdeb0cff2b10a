"""Gradient bugs end to end: find the layer whose backward pass makes the first NaN, pack, replay.

Every model here has a finite forward pass and a NaN gradient, the way it
happens in the wild: `sqrt` behind a square at an all-zero (padding) row,
the `jnp.where` trap, and a norm at a padding row inside a tiny llama-like
transformer (eagerly, under penzai's `Jitted`, inside a `LayerStack`).
Each test asserts the exact layer, and archives replay in fresh processes:
with `reprokit run` and with `replay.py` where `import reprokit` fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import grad_layers
import jax.numpy as jnp
import pytest
from conftest import run_json, run_python, run_reprokit
from penzai import pz
from penzai.toolshed.jit_wrapper import Jitted

import reprokit
from reprokit import CaptureError

BLOCK_REPROKIT = """
import importlib.abc, runpy, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "reprokit":
            raise ModuleNotFoundError("No module named 'reprokit'", name="reprokit")
sys.meta_path.insert(0, _Block())
sys.argv = [{script!r}, "--json"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exit:
    sys.exit(exit.code)
"""


def _replay_without_reprokit(archive, folder) -> tuple[int, dict]:
    """Unzips the archive and runs its replay.py in an interpreter where `import reprokit` fails."""
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(folder)
    result = run_python(BLOCK_REPROKIT.format(script=str(folder / "replay.py")))
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def _assert_gradient_reproduced(archive, tmp_path, *allow: str) -> dict:
    options = [item for module in allow for item in ("--allow-module", module)]
    code, verdict = run_json("run", archive, *options)
    assert code == 0 and verdict["reproduced"] is True, verdict
    assert verdict["signature"]["kind"] == "nonfinite_grad"
    assert verdict["reason"].startswith("gradient issue")
    code, standalone = _replay_without_reprokit(archive, tmp_path / "unzipped")
    assert code == 0 and standalone["reproduced"] is True, standalone
    assert [row["path"] for row in standalone["gradients"]] == [
        row["path"] for row in verdict["gradients"]
    ]
    return verdict


# ------------------------------------------------------------------ sqrt at a zero row


def test_sqrt_model_has_finite_forward_and_nan_gradient():
    import jax

    model, rows = grad_layers.sqrt_model(), grad_layers.rows()
    assert bool(jnp.all(jnp.isfinite(model(rows).unwrap("batch", "out"))))
    unbound, params = pz.unbind_params(model)
    frozen = [p.freeze() for p in params]
    grads = jax.grad(lambda f: grad_layers.squared_loss(pz.bind_variables(unbound, f)(rows)))(
        frozen
    )
    assert bool(jnp.any(jnp.isnan(grads[0].value.unwrap("features", "hidden"))))


def test_find_grad_picks_the_sqrt_not_the_square():
    model = grad_layers.sqrt_model()
    result = reprokit.search(model, grad_layers.rows(), grad=grad_layers.squared_loss)
    assert result.keypath == "Sequential.sublayers[2]"
    assert result.selection.get() is model.sublayers[2]
    found = result.found_by
    assert found["grad"] is True and found["output_cotangent"] == {"nan": 0, "posinf": 0, "neginf": 0}
    assert found["argument_cotangent"]["nan"] + found["argument_cotangent"]["posinf"] > 0
    assert found["also_misbehaved"] == ["(the whole model)"]
    assert "<== CULPRIT" in result.report
    culprit_line = next(line for line in result.report.splitlines() if "CULPRIT" in line)
    assert "Elementwise" in culprit_line
    # find() returns the selection, as for forward checks.
    selection = reprokit.find(model, grad_layers.rows(), grad=grad_layers.squared_loss)
    assert selection.get() is model.sublayers[2]


def test_find_grad_leaves_the_model_untouched():
    model = grad_layers.sqrt_model()
    before = [p.value.unwrap(*p.value.named_shape) for p in pz.unbind_params(model)[1]]
    reprokit.search(model, grad_layers.rows(), grad=grad_layers.squared_loss)
    after = [p.value.unwrap(*p.value.named_shape) for p in pz.unbind_params(model)[1]]
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(before, after, strict=True))


def test_finite_gradients_say_so_and_name_no_culprit():
    with pytest.raises(CaptureError, match="no layer produced a non-finite gradient") as caught:
        reprokit.search(
            grad_layers.sqrt_model(), grad_layers.rows(zero_row=False), grad=grad_layers.squared_loss
        )
    assert "CULPRIT" not in caught.value.report


def test_sqrt_archive_replays_with_run_and_standalone_replay_py(tmp_path):
    result = reprokit.search(grad_layers.sqrt_model(), grad_layers.rows(), grad=grad_layers.squared_loss)
    out = tmp_path / "sqrt.repro.zip"
    packed = result.pack(out, quiet=True)
    assert packed.signature["kind"] == "nonfinite_grad"
    assert packed.self_check["reproduced"] is True
    verdict = _assert_gradient_reproduced(out, tmp_path)
    assert all(row["bitwise_equal"] for row in verdict["gradients"])
    assert all(row["bitwise_equal"] for row in verdict["output"])  # the forward pass was fine
    with zipfile.ZipFile(out) as zipped:
        manifest = json.loads(zipped.read("manifest.json"))
    backward = manifest["backward"]
    assert backward["output_cotangent"][0]["nan"] == 0
    assert any(g["nan"] for g in backward["gradients"])
    assert manifest["found_by"]["grad"] is True
    # Variants work on gradient archives.
    code, repeated = run_json("run", out, "--repeat", "3")
    assert code == 0 and repeated["reproduced"] is True
    text = run_reprokit("run", out, "--stablehlo")
    assert text.returncode == 0, text.stdout + text.stderr
    assert "REPRODUCED" in text.stdout and "gradient issue" in text.stdout
    reference = run_reprokit("run", out, "--reference", "float64")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert "gradients['argument.data_array']" in reference.stdout
    shown = run_reprokit("inspect", out)
    assert shown.returncode == 0, shown.stderr
    html = run_reprokit("inspect", out, "--html", tmp_path / "view.html")
    assert html.returncode == 0, html.stderr
    assert "cotangent at the layer's output: 'output_cotangent[0]'" in shown.stdout
    assert "gradient the layer produced: 'argument.data_array'" in shown.stdout
    page = (tmp_path / "view.html").read_text()
    assert 'id="output_cotangent"' in page and 'id="gradients"' in page
    issue = open(packed.issue_path).read()
    assert "backward pass that makes NaN/Inf" in issue and "| backward pass |" in issue


@pytest.mark.parametrize("jitted", [False, True])
def test_check_exception_names_the_layer_whose_backward_pass_raised(jitted):
    model = grad_layers.fragile_model()
    model = Jitted(model) if jitted else model
    result = reprokit.search(
        model, grad_layers.rows(), grad=grad_layers.squared_loss, check="exception"
    )
    assert result.keypath.endswith("Sequential.sublayers[1]")
    assert result.found_by["raised_in"] == "backward pass"
    assert result.found_by["exception"]["type"] == "builtins.ValueError"
    assert "raised in its backward pass" in result.report
    with pytest.raises(CaptureError, match="backward pass is not supported yet"):
        result.pack("unused.repro.zip", quiet=True)


def test_pack_with_grad_records_the_selected_layer_and_refuses_a_nonfinite_cotangent(tmp_path):
    model = grad_layers.sqrt_model()
    sqrt = pz.select(model).at(lambda m: m.sublayers[2])
    packed = reprokit.pack(
        sqrt, grad_layers.rows(), grad=grad_layers.squared_loss, out=tmp_path / "sqrt.repro.zip",
        check=False, quiet=True,
    )
    assert packed.signature["kind"] == "nonfinite_grad" and packed.keypath == "Sequential.sublayers[2]"
    # The square only turns the sqrt's Inf into NaN: what reaches it is already non-finite.
    square = pz.select(model).at(lambda m: m.sublayers[1])
    with pytest.raises(CaptureError, match="already non-finite"):
        reprokit.pack(
            square, grad_layers.rows(), grad=grad_layers.squared_loss,
            out=tmp_path / "square.repro.zip", check=False, quiet=True,
        )


# ------------------------------------------------------------------ jnp.where trap, under Jitted


def test_where_trap_under_jitted_is_found_packed_and_replayed(tmp_path):
    model = Jitted(grad_layers.where_model())
    result = reprokit.search(model, grad_layers.rows(), grad=grad_layers.squared_loss)
    assert result.keypath == "Jitted.body/Sequential.sublayers[2]"
    assert result.layer_type == "penzai.nn.basic_ops.Elementwise"
    out = tmp_path / "where.repro.zip"
    packed = result.pack(out, allow_modules=["grad_layers"], quiet=True)
    assert packed.mode == "jit"
    _assert_gradient_reproduced(out, tmp_path, "grad_layers")


# ------------------------------------------------------------------ a tiny llama-like transformer


def _llama_side() -> dict:
    return {"token_positions": grad_layers.positions()}


def test_norm_at_padding_row_in_a_llamalike_transformer(tmp_path):
    model = grad_layers.llamalike_with_pad_row()
    result = reprokit.search(
        model, grad_layers.padded_tokens(), side_inputs=_llama_side(), grad=grad_layers.logits_loss
    )
    assert result.layer_type == "grad_layers.UnitNorm"
    assert result.keypath.startswith("TransformerLM.body/Sequential.sublayers[1]/")
    out = tmp_path / "llama.repro.zip"
    result.pack(out, allow_modules=["grad_layers"], quiet=True)
    _assert_gradient_reproduced(out, tmp_path, "grad_layers")


def test_norm_at_padding_row_inside_a_layer_stack(tmp_path):
    model = grad_layers.llamalike_with_pad_row(layer_stack=True)
    result = reprokit.search(
        model, grad_layers.padded_tokens(), side_inputs=_llama_side(), grad=grad_layers.logits_loss
    )
    assert result.layer_type == "grad_layers.UnitNorm"
    assert result.found_by["block"] == 0 and result.call_index == 0
    assert "LayerStack" in result.keypath
    # Inside the scan the cotangent is shipped out of the backward pass; the record replays under jit.
    out = tmp_path / "stack.repro.zip"
    packed = result.pack(out, allow_modules=["grad_layers"], check=False, quiet=True)
    assert packed.mode == "jit" and packed.call_count == 2
    code, verdict = run_json("run", out, "--allow-module", "grad_layers")
    assert code == 0 and verdict["reproduced"] is True


# ------------------------------------------------------------------ the command line


def test_cli_pack_find_nonfinite_with_grad(tmp_path):
    script = tmp_path / "target.py"
    script.write_text(
        "import grad_layers\n"
        "def make_call():\n"
        "    return grad_layers.sqrt_model(), grad_layers.rows()\n"
        "def loss(output):\n"
        "    return grad_layers.squared_loss(output)\n"
    )
    out = tmp_path / "cli.repro.zip"
    result = run_reprokit(
        "pack", f"{script}:make_call", "--find", "nonfinite", "--grad", f"{script}:loss",
        "--out", out, "--no-check",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Sequential.sublayers[2]" in result.stdout
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["signature"]["kind"] == "nonfinite_grad"


def test_replay_script_runs_without_reprokit_in_a_subprocess_python(tmp_path):
    """Sanity: the interpreter the standalone test uses really cannot import reprokit."""
    code = BLOCK_REPROKIT.replace("runpy.run_path", "import reprokit; runpy.run_path").format(
        script=str(tmp_path / "none.py")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "No module named 'reprokit'" in result.stderr


# ------------------------------------------------------------------ training loops


def test_watch_training_packs_the_first_step_with_nan_gradients(tmp_path):
    import jax
    import optax

    unbound, params = pz.unbind_params(grad_layers.sqrt_model(), freeze=True)
    optimizer = optax.sgd(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        def objective(params):
            return grad_layers.squared_loss(pz.bind_variables(unbound, params)(batch))

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    guard = reprokit.watch_training(
        unbound,
        inputs=lambda batch: batch,
        loss=lambda output, batch: grad_layers.squared_loss(output),
        out=tmp_path / "train.repro.zip",
    )
    batches = [grad_layers.rows(zero_row=False)] * 2 + [grad_layers.rows()] * 2
    seen = []
    for batch in batches:
        new_params, opt_state, _, grads = train_step(params, opt_state, batch)
        if not guard.check(grads, params=params, batch=batch):
            break
        seen.append(bool(jnp.all(jnp.isfinite(new_params[0].value.unwrap("features", "hidden")))))
        params = new_params
    assert seen == [True, True] and guard.steps == 3
    (fault,) = guard.faults
    assert fault["step"] == 2 and fault["keypath"] == "Sequential.sublayers[2]"
    assert "<== CULPRIT" in fault["report"]
    assert guard.archives[0].signature["kind"] == "nonfinite_grad"
    code, verdict = run_json("run", tmp_path / "train.repro.zip")
    assert code == 0 and verdict["reproduced"] is True


def test_grad_nan_example_trains_finds_packs_and_replays(tmp_path):
    from conftest import REPO, subprocess_env

    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "grad_nan.py"), "--out", "ex.repro.zip"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "step 2: non-finite gradients" in done.stdout
    assert "<== CULPRIT" in done.stdout and "REPRODUCED: gradient issue" in done.stdout
    code, verdict = run_json("run", tmp_path / "ex.repro.zip", cwd=tmp_path)
    assert code == 0 and verdict["reproduced"] is True
    assert verdict["layer"]["keypath"].endswith("BranchAndAddTogether.branches[1]/Sequential.sublayers[2]")
