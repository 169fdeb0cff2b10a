"""pack never changes the reporter's model: every StateVariable is put back after a capture.

A user who packs inside a decoding loop must find their KV cache, counters and
random streams exactly where they left them, whichever capture path ran.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import models
import numpy as np
from penzai import pz

import reprokit


def _state(tree) -> list[tuple[str | None, list[np.ndarray]]]:
    """Every StateVariable's label and value leaves, as host arrays."""
    _, variables = pz.unbind_variables(tree)
    return [
        (
            var.label,
            [
                np.asarray(leaf)
                for leaf in jax.tree_util.tree_leaves(pz.unbind_variables(var.value)[0])
            ],
        )
        for var in variables
        if isinstance(var, pz.StateVariable)
    ]


def _same(before, after) -> bool:
    if [label for label, _ in before] != [label for label, _ in after]:
        return False
    for (_, left), (_, right) in zip(before, after, strict=True):
        if len(left) != len(right):
            return False
        for a, b in zip(left, right, strict=True):
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
                return False
    return True


def _prefilled():
    model = models.kv_caching()
    model(models.tokens(3))  # prefill: cache_end_index 3
    return model


def _decode_step():
    return pz.nx.wrap(jnp.full((1, 1), 4), "batch", "seq")


def _cache_end(model) -> int:
    (index,) = [
        var
        for var in pz.unbind_variables(model)[1]
        if isinstance(var, pz.StateVariable) and "cache_end_index" in str(var.label)
    ]
    return int(np.asarray(index.value))


def test_pack_inside_a_decoding_loop_leaves_the_kv_cache_alone(tmp_path):
    model = _prefilled()
    assert _cache_end(model) == 3
    before = _state(model)
    selection = pz.select(model).at_instances_of(pz.nn.KVCachingAttention).pick_nth_selected(0)
    reprokit.pack(selection, _decode_step(), out=tmp_path / "kv.repro.zip", quiet=True)
    assert _cache_end(model) == 3
    assert _same(before, _state(model))
    # The loop goes on exactly as without pack.
    reference = _prefilled()
    np.testing.assert_array_equal(
        model(_decode_step()).data_array, reference(_decode_step()).data_array
    )


def test_every_capture_path_leaves_the_kv_cache_alone(tmp_path):
    model = _prefilled()
    before = _state(model)
    selection = pz.select(model).at_instances_of(pz.nn.KVCachingAttention).pick_nth_selected(1)
    # max_size (fitting), redaction, signature (heisenbug re-capture in the other mode).
    reprokit.pack(
        selection,
        _decode_step(),
        out=tmp_path / "fit.repro.zip",
        max_size="50MB",
        check=False,
        quiet=True,
    )
    reprokit.pack(
        selection,
        _decode_step(),
        out=tmp_path / "red.repro.zip",
        redact=["params=random"],
        check=False,
        quiet=True,
    )
    try:
        reprokit.pack(
            selection,
            _decode_step(),
            out=tmp_path / "sig.repro.zip",
            signature="nonfinite",
            check=False,
            quiet=True,
        )
    except reprokit.UsageError:
        pass  # no NaN here: the point is that the re-capture in the other mode left state alone
    assert _same(before, _state(model))
    # find, then packing what it found.
    found = reprokit.search(
        model, _decode_step(), check="mismatch", reference="float64", tolerance=1e-9
    )
    found.pack(tmp_path / "found.repro.zip", check=False, quiet=True)
    assert _same(before, _state(model))


def test_pack_leaves_a_random_stream_where_it_was(tmp_path):
    model = models.dropout_mlp()
    stream = pz.RandomStream.from_base_key(jax.random.key(7))
    stream.next_key()  # mid-run: offset 1
    before = _state(stream)
    selection = pz.select(model).at_instances_of(pz.nn.StochasticDropout).pick_nth_selected(0)
    reprokit.pack(
        selection,
        models.mlp_input(),
        side_inputs={"random_stream": stream},
        out=tmp_path / "drop.repro.zip",
        quiet=True,
    )
    assert _same(before, _state(stream))
    assert int(np.asarray(stream.offset.value)) == 1
