"""Archives proven to reproduce before they leave the reporter, and shareable without the weights."""

from __future__ import annotations

import importlib.util
import zipfile

import cases
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from conftest import REPO, run_json, run_reprokit
from penzai import pz

import reprokit
from reprokit import UsageError


def _example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nan_attention_archive_self_checks_as_reproducing(tmp_path):
    model, tokens, side = _example("nan_attention").make_call()
    selection = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(1)
    out = tmp_path / "attn.repro.zip"
    result = reprokit.pack(selection, tokens, side_inputs=side, out=out)
    assert result.signature["kind"] == "nonfinite"
    assert result.self_check["ran"] and result.self_check["reproduced"]
    assert result.self_check["output_bitwise_equal"]
    assert "self-check: reproduced in a fresh process" in result.summary()
    ran = run_reprokit("run", out)
    assert "reproduced on the reporter's machine after packing: yes" in ran.stdout
    assert "selfcheck.json" in zipfile.ZipFile(out).namelist()


def test_self_check_flags_a_jit_capture_whose_eager_replay_differs(tmp_path):
    selection, argument, side = cases.gemma_attention_case()
    out = tmp_path / "jit.repro.zip"
    result = reprokit.pack(selection, argument, side_inputs=side, out=out, mode="jit")
    other = result.self_check["other_mode"]
    assert result.self_check["reproduced"] and other["mode"] == "eager"
    assert other["same_as_recorded_mode"] is False and other["max_abs_error"] > 0
    assert "captured jit; eager replay differs" in result.summary()
    assert "Maintainers must replay jit" in result.summary()


def test_no_check_skips_the_self_check(tmp_path):
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    result = reprokit.pack(selection, models.mlp_input(), out=tmp_path / "n.repro.zip", check=False)
    assert result.self_check is None
    assert "selfcheck.json" not in zipfile.ZipFile(tmp_path / "n.repro.zip").namelist()


def _planted_inf_model():
    model = models.mlp()
    params = pz.select(model).at_instances_of(pz.Parameter).get_sequence()
    target = params[2]  # the second Linear's weights
    poisoned = target.value.data_array.at[1, 2].set(jnp.inf)

    def plant(param):
        if param.label == target.label:
            return pz.Parameter(
                value=pz.nx.NamedArray(target.value.named_axes, poisoned), label=param.label
            )
        return param

    return pz.select(model).at_instances_of(pz.Parameter).apply(plant), target.label


def test_redacting_params_keeps_the_one_parameter_the_bug_needs(tmp_path):
    model, label = _planted_inf_model()
    selection = pz.select(model).at_keypaths([()])
    out = tmp_path / "redacted.repro.zip"
    result = reprokit.pack(selection, models.mlp_input(), out=out, redact=["params=random"])
    report = result.contents["redaction"]
    assert report["reproduces"] is True
    assert report["kept_parameters"] == [label]
    assert report["parameters_redacted"] == 5
    assert f"kept real values of {label}" in result.summary()
    assert result.self_check["reproduced"]
    # The other parameters really are replaced.
    original = {
        p.label: np.asarray(p.value.data_array)
        for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence()
    }
    loaded = reprokit.load(out)
    for param in pz.select(loaded.submodel).at_instances_of(pz.ParameterValue).get_sequence():
        if np.unique(original[param.label]).size == 1:
            continue  # a constant array (zero biases): its matched statistics are the array itself
        same = np.array_equal(
            np.asarray(param.value.data_array), original[param.label], equal_nan=True
        )
        assert same == (param.label == label), param.label
    readme = zipfile.ZipFile(out).read("README.md").decode()
    manifest = reprokit.load(out).manifest
    assert manifest["redaction"]["kept_parameters"] == [label]
    assert "redact" in readme.lower()


def test_redaction_that_loses_the_bug_says_so(tmp_path):
    weights = jax.random.normal(jax.random.key(0), (4, 4))
    linear = lambda w, label: pz.nn.Linear(  # noqa: E731
        weights=pz.Parameter(value=pz.nx.wrap(w, "features", "features_out"), label=label),
        in_axis_names=("features",),
        out_axis_names=("features_out",),
    )
    # x @ W + x @ (-W) is exactly zero, and 1/0 is inf: only the exact weights produce it.
    model = pz.nn.Sequential(
        [
            pz.nn.BranchAndAddTogether([linear(weights, "w"), linear(-weights, "minus_w")]),
            pz.nn.Elementwise(jnp.reciprocal),
        ]
    )
    selection = pz.select(model).at_keypaths([()])
    x = pz.nx.wrap(jnp.ones((2, 4)), "batch", "features")
    out = tmp_path / "lost.repro.zip"
    result = reprokit.pack(selection, x, out=out, redact={"params": "random"})
    report = result.contents["redaction"]
    assert report["reproduces"] is False
    assert "does NOT reproduce with redacted values" in result.summary()
    assert reprokit.load(out).manifest["redaction"]["reproduces"] is False


def test_big_archive_is_fitted_under_max_size_and_still_reproduces(tmp_path):
    def linear(shape, label, value=None):
        w = jax.random.normal(jax.random.key(len(label)), shape) if value is None else value
        return pz.nn.Linear(
            weights=pz.Parameter(value=pz.nx.wrap(w, "features", "features_out"), label=label),
            in_axis_names=("features",),
            out_axis_names=("features_out",),
        )

    rename = pz.nn.RenameAxes(old="features_out", new="features")
    small = jnp.ones((2000, 4)).at[3, 1].set(jnp.nan)
    model = pz.nn.Sequential(
        [
            linear((2000, 2000), "big1"),
            rename,
            linear((2000, 2000), "big2"),
            rename,
            linear((2000, 2000), "big3"),
            rename,
            linear((2000, 2000), "big4"),
            rename,
            linear((2000, 4), "small", small),
        ]
    )
    selection = pz.select(model).at_keypaths([()])
    x = pz.nx.wrap(jnp.ones((1, 2000)), "batch", "features")
    out = tmp_path / "big.repro.zip"
    unfitted = reprokit.pack(selection, x, out=tmp_path / "unfitted.repro.zip", check=False)
    assert unfitted.size > 60e6
    result = reprokit.pack(selection, x, out=out, max_size="25MB")
    assert result.size < 25e6
    assert result.self_check["reproduced"]
    code, verdict = run_json("run", out)
    assert code == 0 and verdict["reproduced"]
    fit = reprokit.load(out).manifest["size_fit"]
    assert set(fit["zeroed_parameters"]) <= {"big1", "big2", "big3", "big4"}
    with pytest.raises(reprokit.CaptureError, match="over --max-size"):
        reprokit.pack(selection, x, out=tmp_path / "tiny.repro.zip", max_size="10KB")


def test_compress_deflates_arrays_that_pay_and_replays_the_same(tmp_path):
    # 90% zeros, not constant: deflate shrinks it, a fill cannot hold it.
    rng = np.random.default_rng(0)
    values = np.where(rng.random((512, 512)) < 0.1, rng.standard_normal((512, 512)), 0.0)
    values = values.astype(np.float32)
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.exp)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    argument = pz.nx.wrap(jnp.asarray(values), "batch", "features")
    plain = reprokit.pack(selection, argument, out=tmp_path / "plain.repro.zip", check=False)
    packed = reprokit.pack(selection, argument, out=tmp_path / "small.repro.zip", compress=True)
    assert packed.size < plain.size / 4 and packed.self_check["reproduced"]
    assert reprokit.load(packed.path).manifest["compressed_arrays"] == 2
    with zipfile.ZipFile(packed.path) as archive:
        deflated = [i.filename for i in archive.infolist() if i.compress_type == zipfile.ZIP_DEFLATED]
    assert {"arrays/0.bin", "arrays/1.bin"} <= set(deflated)
    code, verdict = run_json("run", packed.path)
    assert code == 0 and verdict["reproduced"] and verdict["output_bitwise_equal"]


def test_heisenbug_suggests_the_mode_that_shows_the_issue(tmp_path):
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    with pytest.raises(UsageError, match="shows none in any of its 1 calls"):
        reprokit.pack(
            selection, models.mlp_input(), out=tmp_path / "h.repro.zip", signature="nonfinite"
        )


def test_sharing_note_lists_what_the_archive_contains(tmp_path):
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    result = reprokit.pack(selection, models.mlp_input(), out=tmp_path / "s.repro.zip", check=False)
    summary = result.summary()
    assert "contains: 32 parameter values" in summary
    assert "float32[3, 4]" in summary and "no value redacted" in summary
    assert "can be downloaded by anyone" in summary
