"""Encoding round trips of every kind of value real penzai models hold (shared/README §5)."""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import models
import numpy as np
import pytest
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.nn import layer_stack

from reprokit import CaptureError, RefusedTypeError
from reprokit.archive._allowlist import AllowList
from reprokit.portable._arrays import describe, rebuild
from reprokit.record._encoding import decode_tree, encode_tree, pack_bytes, unpack_bytes


def round_trip(value, allow=()):
    """Encode, serialise, parse and decode `value`, with arrays through raw bytes."""
    payloads = []

    def on_array(array):
        desc, data = describe(array)
        payloads.append((desc, np.frombuffer(data.tobytes(), dtype=np.uint8)))
        return len(payloads) - 1

    node = unpack_bytes(pack_bytes(encode_tree(value, on_array, extra_modules=allow)))
    return decode_tree(node, AllowList(allow), lambda i: rebuild(*payloads[i]))


def same_leaf(a, b):
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return (
            jax.random.key_impl(a) == jax.random.key_impl(b)
            and np.asarray(jax.random.key_data(a)).tobytes()
            == np.asarray(jax.random.key_data(b)).tobytes()
        )
    if isinstance(a, (jax.Array, np.ndarray)):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and getattr(a, "weak_type", None) == getattr(b, "weak_type", None)
            and np.asarray(a).tobytes() == np.asarray(b).tobytes()
        )
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    "make",
    [
        lambda: jnp.asarray(0.25),  # weak-typed 0-d float, as penzai's variable setter makes
        lambda: jnp.asarray(3),  # weak int
        lambda: jnp.asarray(np.float32(1.5)),  # strong 0-d
        lambda: jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        lambda: jnp.ones((2, 2), dtype=jnp.float8_e4m3fn),
        lambda: jnp.arange(4, dtype=jnp.int4),
        lambda: jnp.array([True, False]),
        lambda: jnp.zeros((0, 3)),
        lambda: jax.random.key(42),
        lambda: jax.random.split(jax.random.key(1), 3),
        lambda: jax.random.key(3, impl="rbg"),
        lambda: np.arange(5, dtype=np.int16),
        lambda: np.float32(2.5),
        lambda: jnp.array([np.nan, np.inf, -np.inf, 1.0]),
        lambda: (
            jnp.asfortranarray(np.arange(6.0).reshape(2, 3))
            if hasattr(jnp, "asfortranarray")
            else np.asfortranarray(np.arange(6.0).reshape(2, 3))
        ),
    ],
)
def test_array_leaves_round_trip_bitwise(make):
    value = make()
    rebuilt = round_trip({"x": value})["x"]
    assert same_leaf(value, rebuilt)


def test_weak_type_decides_dtype_promotion():
    weak = jnp.asarray(0.5)
    rebuilt = round_trip(weak)
    assert rebuilt.weak_type
    assert (jnp.ones(2, jnp.bfloat16) * rebuilt).dtype == jnp.bfloat16


def test_static_values_round_trip():
    value = {
        "odict": collections.OrderedDict([("seq", 3), ("batch", 1)]),
        "axes": ("heads", "projection"),
        "dtype_class": jnp.float32,
        "numpy_type": np.floating,
        "bf16_type": ml_dtypes.bfloat16,
        "np_dtype": np.dtype("bfloat16"),
        "enum": layer_stack.LayerStackVarBehavior.PER_LAYER,
        "partial": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "big": 2**70,
        "floats": (float("nan"), float("inf"), -0.0, 1e-310),
        "nested": [None, True, b"raw", 1 + 2j, slice(1, None, 2)],
        "int_keys": {1: "a", (2, 3): "b"},
        "builtin_type": int,
    }
    rebuilt = round_trip(value)
    assert type(rebuilt["odict"]) is collections.OrderedDict and rebuilt["odict"] == value["odict"]
    assert rebuilt["dtype_class"] is jnp.float32
    assert rebuilt["numpy_type"] is np.floating
    assert rebuilt["bf16_type"] is ml_dtypes.bfloat16
    assert rebuilt["np_dtype"] == value["np_dtype"]
    assert rebuilt["enum"] is layer_stack.LayerStackVarBehavior.PER_LAYER
    assert rebuilt["partial"].func is jax.nn.gelu and rebuilt["partial"].keywords == {
        "approximate": True
    }
    assert rebuilt["relu"] is jax.nn.relu and rebuilt["silu"] is jax.nn.silu
    assert rebuilt["big"] == 2**70
    assert np.isnan(rebuilt["floats"][0]) and rebuilt["floats"][1:] == value["floats"][1:]
    assert str(rebuilt["floats"][2]) == "-0.0"
    assert rebuilt["nested"] == value["nested"]
    assert rebuilt["int_keys"] == value["int_keys"]
    assert rebuilt["builtin_type"] is int


def _metadata(activation_dtype=jnp.float32):
    """A transformer's metadata: a plain (non-penzai) dataclass that real models hold."""
    return model_parts.TransformerMetadata(
        common_head_axes={"heads": 2},
        query_only_head_axes={},
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=16,
        vocab_size=11,
        activation_dtype=activation_dtype,
    )


def test_dataclasses_and_shapecheck_objects_round_trip():
    metadata = _metadata()
    spec = pz.chk.ArraySpec(
        named_shape={"a": pz.chk.var("A"), **pz.chk.var("B*")}, dtype=jnp.floating
    )
    rebuilt_metadata, rebuilt_spec = round_trip((metadata, spec))
    assert rebuilt_metadata == metadata
    assert rebuilt_spec == spec


def test_named_array_and_view_keep_their_types():
    array = pz.nx.wrap(jnp.arange(6.0).reshape(2, 3), "a", "b")
    view = array.untag("a")
    rebuilt_array, rebuilt_view = round_trip((array, view))
    assert type(rebuilt_array) is pz.nx.NamedArray and type(rebuilt_view) is pz.nx.NamedArrayView
    assert jax.tree_util.tree_structure(rebuilt_view) == jax.tree_util.tree_structure(view)


def test_whole_transformer_round_trips_with_its_structure():
    # Isolated records hold frozen parameters (ParameterValue), never live variables.
    model = pz.freeze_params(models.llamalike(jnp.bfloat16, gemma=True))
    rebuilt = round_trip(model)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(model) or str(
        jax.tree_util.tree_structure(rebuilt)
    ) == str(jax.tree_util.tree_structure(model))
    for a, b in zip(
        jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(rebuilt), strict=True
    ):
        assert same_leaf(a, b)


def test_user_classes_need_their_module_allowed():
    import custom_layers

    layer = custom_layers.RaisesOnLongSequences(limit=3)
    assert round_trip(layer, allow=("custom_layers",)) == layer
    with pytest.raises(RefusedTypeError, match="--allow-module custom_layers"):
        payloads = []
        node = encode_tree(
            layer, lambda a: payloads.append(a) or 0, extra_modules=("custom_layers",)
        )
        decode_tree(node, AllowList(), lambda i: None)


def test_values_that_cannot_be_saved_are_refused_with_their_location():
    class Local:
        pass

    with pytest.raises(CaptureError, match=r"record\['k'\]"):
        encode_tree({"k": object()}, lambda a: 0)
    with pytest.raises(CaptureError, match="closure|inside another function"):
        encode_tree({"k": Local}, lambda a: 0)
    with pytest.raises(CaptureError, match="lambda"):
        encode_tree([lambda x: x], lambda a: 0)


def test_error_paths_name_the_exact_place_deep_in_a_tree():
    """Paths are built only when an error needs one; they must still be exact."""
    metadata = _metadata(activation_dtype=object())
    with pytest.raises(CaptureError, match=r"^record\['a'\]\[1\]\.activation_dtype holds"):
        encode_tree({"a": [0, metadata]}, lambda a: 0)
    with pytest.raises(CaptureError, match=r"^argument\[0\]\['x'\] holds"):
        encode_tree(({"x": object()},), lambda a: 0, where="argument")
    traced = []

    @jax.jit
    def inside(x):
        try:
            encode_tree({"w": [x]}, lambda a: 0)
        except CaptureError as error:
            traced.append(str(error))
        return x

    inside(jnp.ones(2))
    assert traced and traced[0].startswith("record['w'][0] is a traced value")


def test_the_encoder_reports_every_name_it_writes():
    """`names_out` is what `_grammar.named` finds: pack relies on it instead of a walk."""
    from reprokit.archive._grammar import named

    model = pz.freeze_params(models.llamalike(jnp.float32))
    value = {
        "model": model,
        "enum": layer_stack.LayerStackVarBehavior.PER_LAYER,
        "partial": functools.partial(jax.nn.gelu, approximate=True),
        "init": jax.nn.initializers.lecun_normal(),
        "type": pz.nn.Linear,
        "relu": jax.nn.relu,
    }
    names: set[str] = set()
    encoded = encode_tree(value, lambda a: 0, names_out=names)
    assert names == set(named(encoded))
    assert {"jax.nn:gelu", "penzai.nn.linear_and_affine:Linear"} <= names


def test_the_decoder_refuses_fields_that_differ_from_the_class():
    node = encode_tree(pz.nn.Elementwise(jax.nn.relu), lambda a: 0)
    for fields in ([], [["fn", node["f"][0][1]], ["extra", 1]], [["other", 1]], "fn"):
        with pytest.raises(Exception, match="do not match the class"):
            decode_tree({**node, "f": fields}, AllowList(), lambda i: None)
