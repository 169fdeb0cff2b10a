"""`reprokit inspect` readable at a glance, and find's report without runs of unused layers.

Keypaths are wrapped, never cut from the left; state variables are named by
their labels; NaN, +Inf and -Inf are counted apart; one-element arrays show
their value, non-finite ones included.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import models
import pytest
from conftest import run_reprokit
from penzai import pz
from test_pack_state import _decode_step, _prefilled

import reprokit
from reprokit.capture._find_report import _collapse_not_called


@pytest.fixture(scope="module")
def kv_archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("readable") / "kv.repro.zip"
    model = _prefilled()
    selection = pz.select(model).at_instances_of(pz.nn.KVCachingAttention).pick_nth_selected(1)
    reprokit.pack(selection, _decode_step(), out=out, check=False, quiet=True)
    return out


def _table(text: str) -> list[str]:
    start = text.index("  #  where")
    return text[start : text.index("\nstructure:")].splitlines()


def test_state_variables_are_named_by_their_labels_and_scalars_show_values(kv_archive):
    shown = run_reprokit("inspect", kv_archive)
    assert shown.returncode == 0, shown.stderr
    table = _table(shown.stdout)
    assert "+Inf" in table[0] and "-Inf" in table[0]
    assert any("initial_var_values['sampler/cache_1'].value[0]" in line for line in table)
    assert not any("initial_var_values[0]" in line for line in table)
    (cache_end,) = [line for line in table if "side_inputs['cache_end_index']" in line]
    assert "= 4" in cache_end.split("int32[]")[1] or "= 3" in cache_end.split("int32[]")[1]
    # Wrapped, never cut from the left: no cell starts with "...", and every
    # path of the JSON table can be read back from the text.
    assert not any(line[6:].lstrip().startswith("...") for line in table)
    rows = json.loads(run_reprokit("inspect", kv_archive, "--json").stdout)["statistics"]
    paths = []
    for line in table[1:]:
        cells = line.split()
        if cells[0].isdigit():
            paths.append(cells[1])
        else:
            paths[-1] += line.strip()  # a continuation line holds only the path
    assert paths == [row["where"] for row in rows]


def test_nan_plus_inf_and_minus_inf_are_counted_apart(tmp_path):
    model = pz.nn.Sequential([pz.nn.Elementwise(jnp.log)])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise)
    vector = tmp_path / "log.repro.zip"
    argument = pz.nx.wrap(jnp.array([-1.0, 0.0, jnp.inf, 2.0]), "features")
    reprokit.pack(selection, argument, out=vector, check=False, quiet=True)
    scalar = tmp_path / "log0.repro.zip"
    reprokit.pack(selection, pz.nx.wrap(jnp.float32(0.0)), out=scalar, check=False, quiet=True)

    rows = {
        r["where"]: r
        for r in json.loads(run_reprokit("inspect", vector, "--json").stdout)["statistics"]
    }
    output = rows["output.data_array"]
    assert (output["nan"], output["posinf"], output["neginf"]) == (1, 1, 1)
    assert rows["argument.data_array"]["posinf"] == 1 and rows["argument.data_array"]["neginf"] == 0
    text = run_reprokit("inspect", scalar).stdout
    (line,) = [x for x in _table(text) if x.split()[1:2] == ["output.data_array"]]
    assert "= -inf" in line
    assert line.split()[-3:] == ["0", "0", "1"]  # NaN, +Inf, -Inf


def test_runs_of_not_called_layers_fold_into_one_line():
    rows = [
        ("Model", "finite", "1 NaN", "(contains the culprit)"),
        ("  .a: Linear", "", "not called", ""),
        ("  .b: Linear", "", "not called", ""),
        ("  .c: Linear", "", "not called", ""),
        ("  .d: Softmax", "finite", "1 NaN", "<== CULPRIT"),
        ("  .e: Linear", "", "not called", ""),
    ]
    folded = _collapse_not_called(rows)
    assert folded == [
        rows[0],
        ("  ... 3 layers", "", "not called", ""),
        rows[4],
        rows[5],
    ]


def test_a_real_find_report_still_lists_every_called_layer():
    model = models.mlp()
    poisoned = (
        pz.select(model)
        .at_instances_of(pz.Parameter)
        .pick_nth_selected(1)
        .apply(lambda p: pz.Parameter(value=p.value * jnp.nan, label=p.label))
    )
    found = reprokit.search(poisoned, models.mlp_input())
    assert "<== CULPRIT" in found.report and "... " not in found.report.split("\n\n", 1)[1]
