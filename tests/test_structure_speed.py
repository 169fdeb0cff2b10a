"""The shortcuts that make checking a big structure fast refuse exactly what the plain walk refuses.

`check_structure` checks long runs of array nodes in one pass, remembers
descriptors and names it has accepted, and `unpack_bytes` counts containers
only when the bytes could hold too many. Each test here puts the defect
where a shortcut would have to notice it, and expects the message the
one-by-one check gives. No timings: speed is measured, not tested.
"""

from __future__ import annotations

import copy

import msgpack
import pytest

from reprokit._errors import ArchiveError, RefusedTypeError
from reprokit.archive import _grammar, _structure
from reprokit.archive._structure import check_structure

_DESC = {"kind": "jax", "weak_type": False, "dtype": "float32", "shape": [2], "nbytes": 8}


def _archive(count: int = 20, items: list | None = None) -> tuple[dict, dict]:
    arrays = [dict(_DESC, shape=list(_DESC["shape"])) for _ in range(count)]
    argument = items if items is not None else [{"$t": "array", "i": i} for i in range(count)]
    record = {
        "submodel": {"$t": "obj", "type": "penzai.nn.grouping:Sequential", "f": [["sublayers", []]]},
        "argument": {"$t": "tuple", "v": argument},
        "side_inputs": {"$t": "dict", "v": []},
        "initial_var_values": {"$t": "tuple", "v": []},
        "output": {"$t": "tuple", "v": []},
        "final_var_values": {"$t": "tuple", "v": []},
    }
    manifest = {"signature": {"kind": "output"}, "arrays": {"count": count, "bytes": 8 * count}}
    return {"record": record, "arrays": arrays}, manifest


def _refusal(structure: dict, manifest: dict) -> str:
    with pytest.raises(ArchiveError) as caught:
        check_structure(structure, manifest, None)
    return str(caught.value)


def test_a_long_run_of_arrays_and_plain_values_passes():
    structure, manifest = _archive(items=[{"$t": "array", "i": i} for i in range(20)] + [1, "x"])
    check_structure(structure, manifest, None)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"$t": "array", "i": 99}, "structure refers to array 99, which the archive does not hold"),
        ({"$t": "array", "i": -1}, "structure refers to array -1, which the archive does not hold"),
        ({"$t": "array", "i": True}, "malformed 'array' node (its index is not an integer)"),
        ({"$t": "array", "i": 1.0}, "malformed 'array' node (its index is not an integer)"),
        ({"$t": "array", "i": 1, "x": 0}, "malformed 'array' node (unexpected or missing keys)"),
        ({"$t": "array"}, "malformed 'array' node (unexpected or missing keys)"),
        ({"$t": "arrays", "i": 1}, "unknown node kind 'arrays'"),
        ({"i": 1, "j": 2}, "unknown node kind None"),
    ],
)
def test_one_bad_node_in_a_long_run_is_named(bad, message):
    items = [{"$t": "array", "i": i} for i in range(20)]
    items[7] = bad
    assert message in _refusal(*_archive(items=items))


def test_the_last_bad_node_of_a_run_is_reported_first_as_before():
    # Children are popped last first: of two bad items, the later one is named.
    items = [{"$t": "array", "i": i} for i in range(20)]
    items[3], items[15] = {"$t": "array", "i": 50}, {"$t": "array", "i": 60}
    assert "array 60" in _refusal(*_archive(items=items))


def test_a_run_at_the_depth_limit_is_refused(monkeypatch):
    monkeypatch.setattr(_structure, "MAX_DEPTH", 1)
    structure, manifest = _archive(items=[[{"$t": "array", "i": i} for i in range(20)]])
    assert "nested more than 1 levels deep" in _refusal(structure, manifest)


def test_a_run_that_crosses_the_node_limit_is_refused(monkeypatch):
    monkeypatch.setattr(_structure, "MAX_NODES", 15)
    assert _refusal(*_archive()) == "structure has too many nodes"


def test_an_unused_array_is_still_noticed_after_a_run():
    structure, manifest = _archive(items=[{"$t": "array", "i": i % 19} for i in range(20)])
    assert _refusal(structure, manifest) == (
        "array 19 is in the array table but the record never uses it"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("shape", [True], "array 12: invalid array dimension True"),
        ("weak_type", 0, "array 12: weak_type is not a boolean"),
        ("nbytes", 8.5, "array 12: array byte size does not match its dtype and shape"),
        ("shape", (2,), "array 12: array shape is not a list of at most 64 sizes"),
    ],
)
def test_a_descriptor_equal_to_an_accepted_one_but_of_another_type_is_refused(
    field, value, message
):
    # True == 1, 0 == False and (2,) looks like [2]: remembering accepted
    # descriptors must not let these through.
    structure, manifest = _archive()
    if field == "shape" and value == [True]:
        for desc in structure["arrays"]:
            desc.update(shape=[1], nbytes=4)
        manifest["arrays"]["bytes"] = 4 * 20
    structure["arrays"][12][field] = value
    assert _refusal(structure, manifest) == message


def test_a_refused_name_is_refused_every_time_it_appears():
    structure, manifest = _archive()
    bad = {"$t": "fn", "name": "os:system"}
    structure["record"]["submodel"]["f"][0][1] = [bad, copy.deepcopy(bad)]
    with pytest.raises(RefusedTypeError):
        check_structure(structure, manifest, None)
    # A rules object remembers only names it accepted.
    rules = _structure._NameRules(None)
    for _ in range(2):
        with pytest.raises(RefusedTypeError):
            rules.callable_name("os:system")


def test_map_keys_are_checked_whether_or_not_containers_are_counted():
    repeated = b"\x82\xa1a\x01\xa1a\x02"  # {"a": 1, "a": 2}
    binary_key = b"\x81\xc4\x01a\x01"  # {b"a": 1}
    for data in (repeated, binary_key):
        for containers in (None, 0):
            with pytest.raises(ArchiveError) as caught:
                _grammar.unpack_bytes(data, containers=containers)
            assert str(caught.value) in (
                "structure is not valid msgpack (ValueError)",
                "structure holds more than 0 lists and maps; refused while parsing",
            )
    with pytest.raises(ArchiveError, match="not valid msgpack"):
        _grammar.unpack_bytes(repeated)


def test_containers_are_counted_when_the_bytes_could_hold_too_many():
    data = msgpack.packb([[0]] * 50)
    assert _grammar.unpack_bytes(data, containers=51) == [[0]] * 50
    with pytest.raises(ArchiveError, match="more than 50 lists and maps"):
        _grammar.unpack_bytes(data, containers=50)
    # Bytes that look like container markers inside strings only raise the bound.
    text = msgpack.packb(["\u0090" * 40])
    assert _grammar.unpack_bytes(text, containers=1) == ["\u0090" * 40]
    assert _grammar.unpack_bytes(bytearray(data), containers=51) == [[0]] * 50


def test_walk_yields_every_node_in_order():
    tree = {"$t": "tuple", "v": [{"$t": "array", "i": 0}, [1, {"$t": "array", "i": 1}], "s"]}
    assert [path for path, _ in _grammar.walk(tree, "x")] == [
        "x",
        "x[0]",
        "x[1]",
        "x[1][0]",
        "x[1][1]",
        "x[2]",
    ]
