"""`reprokit inspect`: per-array statistics without jax, and the treescope HTML view in a browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap

import custom_layers
import jax
import jax.numpy as jnp
import ml_dtypes
import models
import numpy as np
import pytest
from _chromium import evaluate_in_page
from click.testing import CliRunner
from conftest import run_python, run_reprokit
from penzai import pz

import reprokit
from reprokit._cli import main
from reprokit.views._inspect import array_statistics, walk_encoded

CHROMIUM = "/usr/bin/chromium"


def _raw(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _desc(values: np.ndarray, kind: str = "jax") -> dict:
    return {
        "kind": kind,
        "dtype": values.dtype.name,
        "shape": list(values.shape),
        "nbytes": values.nbytes,
    }


@pytest.fixture(scope="module")
def nan_archive(tmp_path_factory):
    """An MLP whose second Linear has one NaN weight, packed at that Linear."""
    model = models.mlp()
    poisoned = (
        pz.select(model)
        .at_instances_of(pz.nn.Linear)
        .pick_nth_selected(1)
        .at(lambda linear: linear.weights)
        .apply(
            lambda p: pz.Parameter(
                value=jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), p.value),
                label=p.label,
            )
        )
    )
    selection = pz.select(poisoned).at_instances_of(pz.nn.Linear).pick_nth_selected(1)
    out = tmp_path_factory.mktemp("nan") / "nan.repro.zip"
    reprokit.pack(selection, models.mlp_input(), out=out)
    return out


@pytest.fixture(scope="module")
def attention_archive(tmp_path_factory):
    model = models.llamalike()
    selection = pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(0)
    out = tmp_path_factory.mktemp("attn") / "attn.repro.zip"
    side = {"token_positions": models.token_positions()}
    reprokit.pack(selection, models.tokens(), side_inputs=side, out=out)
    return out


def test_float_statistics_are_over_finite_values_with_nan_and_inf_counted():
    values = np.array([1.0, -2.0, np.nan, np.inf, -np.inf, 4.0], dtype=np.float32)
    stats = array_statistics(_desc(values), _raw(values))
    assert (stats["min"], stats["max"], stats["mean"]) == (-2.0, 4.0, 1.0)
    assert (stats["nan"], stats["inf"]) == (1, 2)
    assert stats["shape"] == [6] and stats["dtype"] == "float32"


def test_ml_dtypes_are_read_without_jax():
    values = np.array([[0.5, np.nan], [3.0, -1.0]], dtype=ml_dtypes.bfloat16)
    stats = array_statistics(_desc(values), _raw(values))
    assert stats["dtype"] == "bfloat16" and stats["shape"] == [2, 2]
    assert (stats["min"], stats["max"], stats["mean"], stats["nan"]) == (-1.0, 3.0, 2.5 / 3, 1)
    packed = np.array([-8, 7, 1], dtype=ml_dtypes.int4)
    stats = array_statistics(_desc(packed), _raw(packed))
    assert (stats["min"], stats["max"], stats["nan"]) == (-8, 7, 0)


def test_integer_bool_complex_and_empty_arrays():
    big = np.array([0, 2**64 - 1], dtype=np.uint64)
    stats = array_statistics(_desc(big), _raw(big))
    assert stats["max"] == 2**64 - 1 and stats["min"] == 0  # exact, no wrap-around
    flags = np.array([True, False, True])
    stats = array_statistics(_desc(flags), _raw(flags))
    assert (stats["min"], stats["max"], stats["mean"]) == (False, True, pytest.approx(2 / 3))
    waves = np.array([3 + 4j, np.nan + 0j, 1j], dtype=np.complex64)
    stats = array_statistics(_desc(waves), _raw(waves))
    assert (stats["min"], stats["max"], stats["nan"]) == (1.0, 5.0, 1)  # magnitudes
    empty = np.zeros((0, 3), np.float32)
    stats = array_statistics(_desc(empty), _raw(empty))
    assert stats["size"] == 0 and stats["min"] is None and stats["mean"] is None


def test_prng_keys_are_shown_as_keys_without_statistics():
    data = np.zeros((3, 2), np.uint32)
    desc = {**_desc(data, "key"), "key_impl": "threefry2x32"}
    stats = array_statistics(desc, _raw(data))
    assert stats["dtype"] == "key<threefry2x32>" and stats["shape"] == [3]
    assert stats["min"] is None and stats["mean"] is None


def test_statistics_are_computed_in_chunks(monkeypatch):
    from reprokit.views import _inspect

    monkeypatch.setattr(_inspect, "_STATS_CHUNK", 7)
    values = np.arange(-50, 51, dtype=np.float64)
    values[10] = np.nan
    stats = array_statistics(_desc(values), _raw(values))
    finite = values[np.isfinite(values)]
    assert (stats["min"], stats["max"], stats["nan"]) == (-50.0, 50.0, 1)
    assert stats["mean"] == pytest.approx(finite.mean())


def test_inspect_prints_statistics_and_imports_no_jax(nan_archive):
    code = textwrap.dedent(
        f"""
        import sys
        from click.testing import CliRunner
        from reprokit._cli import main
        result = CliRunner().invoke(main, ["inspect", {str(nan_archive)!r}])
        print(result.output)
        assert result.exit_code == 0, result.output
        leaked = sorted(m for m in ("jax", "jaxlib", "penzai", "treescope") if m in sys.modules)
        assert not leaked, leaked
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert "min, max and mean are over finite values" in text
    rows = {line.split()[1]: line for line in text.splitlines() if re.match(r"\s+\d+\s", line)}
    # One NaN in the weights, and the whole output column it feeds is NaN
    # (columns NaN, +Inf, -Inf).
    weights = rows["submodel.weights.value.data_array"]
    assert re.search(r"float32\[8,8\].*\s1\s+0\s+0$", weights), weights
    assert re.search(r"float32\[3,8\].*\s3\s+0\s+0$", rows["output.data_array"]), text


def test_inspect_json_statistics_match_the_rebuilt_arrays(nan_archive):
    result = CliRunner().invoke(main, ["inspect", str(nan_archive), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    rows = {row["where"]: row for row in payload["statistics"]}
    loaded = reprokit.load(nan_archive)
    output = np.asarray(loaded.record["output"].data_array)
    row = rows["output.data_array"]
    finite = output[np.isfinite(output)]
    assert row["nan"] == int(np.isnan(output).sum()) and row["inf"] == 0
    assert row["min"] == pytest.approx(float(finite.min()))
    assert row["mean"] == pytest.approx(float(finite.mean()), rel=1e-6)
    assert len(payload["statistics"]) == len(payload["arrays"])


def test_paths_follow_the_encoded_tree():
    node = {
        "$t": "obj",
        "type": "m:C",
        "f": [["a", [1, {"$t": "array", "i": 0}]], ["b", {"$t": "dict", "v": [["k", 2]]}]],
    }
    paths = [where for where, _ in walk_encoded(node, "root")]
    assert paths == ["root", "root.a", "root.a[0]", "root.a[1]", "root.b", "root.b['k']"]


def test_array_paths_are_where_the_walk_first_meets_each_array():
    from reprokit.views._inspect import array_paths

    inner = {"$t": "tuple", "v": [{"$t": "array", "i": 1}, [{"$t": "array", "i": 0}]]}
    record = {
        "argument": {
            "$t": "obj",
            "type": "m:C",
            "f": [["x", inner], ["y", {"$t": "array", "i": 0}]],
        },
        "output": [{"$t": "array", "i": 2}, {"$t": "array", "i": 1}, 3],
    }
    expected: dict[int, str] = {}
    for name, node in record.items():
        for where, item in walk_encoded(node, name):
            if isinstance(item, dict) and item.get("$t") == "array":
                expected.setdefault(item["i"], where)
    assert (
        array_paths(record)
        == expected
        == {
            1: "argument.x[0]",
            0: "argument.x[1][0]",
            2: "output[0]",
        }
    )


def test_batched_statistics_equal_the_one_by_one_statistics():
    # Value for value and type for type (repr tells -0.0 from 0.0): the table
    # and --json must not depend on which path an array took.
    from reprokit.views._inspect import _small_statistics

    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.5, -2.0, np.nan, np.inf, -np.inf, 1e308])
    arrays = []
    for size in (1, 1, 2, 3, 7, 8, 9, 130, 8192, 8193):
        for dtype in (np.float32, np.float64, ml_dtypes.bfloat16, np.float16):
            with np.errstate(all="ignore"):
                arrays.append(rng.choice(special, size).astype(dtype))
                arrays.append((rng.standard_normal(size) * 1e3).astype(dtype))
        arrays.append(rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True))
        arrays.append(rng.integers(-128, 127, size).astype(np.int8))
        arrays.append(rng.integers(-8, 7, size).astype(ml_dtypes.int4))
        arrays.append(rng.random(size) < 0.5)
        arrays.append((rng.standard_normal(size) + 1j).astype(np.complex64))
    descs = [_desc(values) for values in arrays]
    payloads = [_raw(values).tobytes() for values in arrays]
    where = {index: f"argument[{index}]" for index in range(len(arrays))}
    rows: list = [None] * len(arrays)
    _small_statistics(descs, list(range(len(arrays))), payloads, where, rows)
    for index, (desc, values) in enumerate(zip(descs, arrays, strict=True)):
        expected = {"index": index, "where": where[index], **array_statistics(desc, _raw(values))}
        assert repr(rows[index]) == repr(expected), desc


# ------------------------------------------------------------------ HTML

# Treescope draws into shadow DOM, which no DOM dump serializes. This probe,
# evaluated in the page, resolves once every treescope root has rendered (or
# after 60 real seconds) with their text, styles and scripts left out.
_PROBE = """
new Promise((resolve) => {
  const started = Date.now();
  const text = (root) => Array.from(root.children).map((child) => {
    if (child.tagName === "STYLE" || child.tagName === "SCRIPT") return "";
    const copy = child.cloneNode(true);
    copy.querySelectorAll("style, script").forEach((e) => e.remove());
    return copy.textContent;
  }).join("");
  const probe = () => {
    const roots = Array.from(document.querySelectorAll("treescope-container"));
    const texts = roots.map((r) => (r.shadowRoot ? text(r.shadowRoot) : ""));
    const arrays = roots.map((r) =>
      r.shadowRoot ? r.shadowRoot.querySelectorAll(".arrayviz_container").length : 0);
    const done = roots.length > 0 && texts.every((t) => t && !t.includes("(Loading...)"));
    // Treescope renders a root only once it nears the viewport, as a reader scrolls.
    roots.filter((r, i) => !texts[i] || texts[i].includes("(Loading...)"))
      .forEach((r) => r.scrollIntoView());
    if (done || Date.now() - started > 60000) {
      resolve({done, texts, arrays, seconds: (Date.now() - started) / 1000});
    } else {
      setTimeout(probe, 100);
    }
  };
  probe();
})
"""


def _render_in_chromium(page, tmp_path) -> dict:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium) to check the HTML view")
    return evaluate_in_page(CHROMIUM, page, _PROBE, tmp_path / "chromium-profile")


def test_html_view_renders_layer_names_in_headless_chromium(attention_archive, tmp_path):
    page = tmp_path / "attn.html"
    result = CliRunner().invoke(main, ["inspect", str(attention_archive), "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "works offline" in result.output
    source = page.read_text()
    # Offline: nothing is fetched from anywhere.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", source)
    # The treescope parts are compressed, so their text appears only if the scripts ran.
    assert "ApplyRoPE" not in source
    rendered = _render_in_chromium(page, tmp_path)
    assert rendered["done"], rendered
    layer, argument, side_inputs, _state, output, _final = rendered["texts"]
    for name in ("Attention", "input_to_query", "Linear", "ApplyRoPE", "Softmax"):
        assert name in layer, name
    assert "embedding:8" in argument and "token_positions" in side_inputs
    assert "NamedArray" in output
    # Arrays are drawn as treescope's array visualisations.
    assert rendered["arrays"][0] > 0 and rendered["arrays"][1] > 0


def test_html_needs_the_same_allow_list_as_run(tmp_path):
    model = pz.nn.Sequential([models.mlp(), custom_layers.RaisesOnLongSequences(limit=2)])
    selection = pz.select(model).at_instances_of(custom_layers.RaisesOnLongSequences)
    archive = tmp_path / "raise.repro.zip"
    reprokit.pack(
        selection,
        pz.nx.wrap(jnp.ones((4, 4)), "seq", "features"),
        out=archive,
        allow_modules=["custom_layers"],
    )
    page = tmp_path / "raise.html"
    refused = run_reprokit("inspect", archive, "--html", page)
    assert refused.returncode == 3 and not page.exists()
    assert len(refused.stderr.strip().splitlines()) == 1 and "custom_layers" in refused.stderr
    shown = CliRunner().invoke(
        main, ["inspect", str(archive), "--html", str(page), "--allow-module", "custom_layers"]
    )
    assert shown.exit_code == 0, shown.output
    assert "sequence length 4 exceeds limit 2" in page.read_text()
    if shutil.which(CHROMIUM):
        rendered = _render_in_chromium(page, tmp_path)
        assert rendered["done"] and "RaisesOnLongSequences" in rendered["texts"][0]
