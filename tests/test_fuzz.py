"""Fuzzing: a mutated archive ends in a clean ReprokitError or a correct load, nothing else.

Hypothesis picks a real archive (packed here), a mutation from
`fuzzer` (bit flips, truncation, member reordering, added, dropped,
renamed or pickled members, manifest fields, structure nodes, array
descriptors, byte edits behind fixed CRCs) and the mutation's random
choices, then runs verify, inspect's reading and load on the result. A
mutation of raw bytes that still loads must load the original record
bitwise; a load must never succeed where verify refused. About 30 seconds;
`python tests/fuzzer.py --cases 10000` is the long run.
"""

from __future__ import annotations

import random

import fuzzer as _fuzz
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reprokit


class _Bases(dict):
    """name -> (path, fingerprint); a short repr keeps hypothesis' reports readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} base archives>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> _Bases:
    folder = tmp_path_factory.mktemp("fuzz-bases")
    paths = _fuzz.make_base_archives(folder)
    return _Bases(
        {
            name: (path, _fuzz.fingerprint(reprokit.load(path).record))
            for name, path in paths.items()
        }
    )


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.sampled_from(["linear", "whole", "dropout", "raises"]),
    kind=st.sampled_from(_fuzz.KINDS),
    rng=st.randoms(use_true_random=False),
)
def test_mutated_archives_fail_cleanly_or_load_correctly(bases, tmp_path_factory, base, kind, rng):
    path, original = bases[base]
    data, raw = _fuzz.mutate(random.Random(rng.getrandbits(64)), kind, path)
    case = tmp_path_factory.getbasetemp() / "fuzz-case.repro.zip"
    case.write_bytes(data)
    with _fuzz.restored_jax_config():
        outcome, detail = _fuzz.check_archive(str(case), original if raw else None, replay=True)
    assert outcome in ("error", "load"), f"{kind} on {base}: {outcome}: {detail}"


def test_reordering_members_loads_the_same_record(bases):
    """A sanity check of the harness: a meaning-preserving mutation loads bitwise."""
    path, original = bases["dropout"]
    for seed in range(3):
        data, raw = _fuzz.mutate(random.Random(seed), "reorder", path)
        assert raw
        case = f"{path}.reordered.zip"
        with open(case, "wb") as file:
            file.write(data)
        assert _fuzz.check_archive(case, original) == ("load", "")


def test_the_escape_watch_sees_what_loading_must_never_do(tmp_path, tmp_path_factory):
    """The audit hook behind the long run and the hostile driver really fires."""
    import pickle
    import subprocess
    import sys

    watch = _fuzz.EscapeWatch(str(tmp_path))
    sys.addaudithook(watch.hook)  # inert outside watching()
    outside = tmp_path_factory.mktemp("outside") / "written.txt"
    with watch.watching() as seen:
        (tmp_path / "inside.txt").write_text("fine")
        eval("1 + 1")  # what a loader must never do
        subprocess.run(["true"], check=False)
        pickle.loads(pickle.dumps(_fuzz.Member("x", b"")))
        outside.write_text("not fine")
    text = " | ".join(seen)
    assert "compile outside an import" in text
    assert "subprocess.Popen" in text
    assert "pickle.find_class" in text
    assert "open for writing" in text and "written.txt" in text
    assert "inside.txt" not in text
    with watch.watching() as seen:
        import importlib

        importlib.reload(importlib.import_module("reprokit.archive._format"))
    assert seen == []


def _rewritten(path: str, out: str, *, manifest=None, structure=None) -> str:
    """A copy of the archive at `path` with its manifest or structure edited in place."""
    import json

    import msgpack

    members = _fuzz.read_members(path)
    if manifest is not None:
        data = json.loads(next(m.data for m in members if m.name == "manifest.json"))
        manifest(data)
        members = _fuzz.replace_member(members, "manifest.json", json.dumps(data).encode())
    if structure is not None:
        data = msgpack.unpackb(next(m.data for m in members if m.name == "structure.msgpack"))
        structure(data)
        members = _fuzz.replace_member(members, "structure.msgpack", msgpack.packb(data))
    _fuzz.write_members(members, out)
    return out


def _deep(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


# Holes the fuzzers found, each now a clean refusal (or a load).
REGRESSIONS = {
    # TypeError: unhashable list in `key_impl in frozenset` (check_descriptor).
    "key-impl-list": (
        "linear",
        dict(structure=lambda s: s["arrays"][0].update(kind="key", key_impl=["x"])),
        "PRNG implementation",
    ),
    # RecursionError while formatting the message about a deeply nested tag.
    "deep-tag": (
        "linear",
        dict(
            structure=lambda s: s["record"]["side_inputs"]["v"].append(["x", {"$t": _deep(1010)}])
        ),
        "unknown node kind",
    ),
    # RecursionError when replay compared deeply nested environment fields.
    "deep-manifest": (
        "linear",
        dict(manifest=lambda m: m["environment"].__setitem__("extra", _deep(40))),
        "nested too deeply",
    ),
    # AttributeError in replay: final variable values that are not variables.
    "bad-final-state": (
        "dropout",
        dict(
            structure=lambda s: s["record"]["final_var_values"]["v"].append(
                {"$t": "fn", "name": "jax.nn:relu"}
            )
        ),
        "StateVariableValues",
    ),
    # RuntimeError from jax: the recorded config forbade execution.
    "no-execution": (
        "linear",
        dict(
            manifest=lambda m: m["environment"]["jax_config"].__setitem__("jax_no_execution", True)
        ),
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_holes_found_by_fuzzing_stay_closed(bases, tmp_path, name):
    base, edits, message = REGRESSIONS[name]
    path = _rewritten(bases[base][0], str(tmp_path / f"{name}.repro.zip"), **edits)
    with _fuzz.restored_jax_config():
        outcome, detail = _fuzz.check_archive(path, None, replay=True)
    if message is None:
        assert outcome == "load", detail
    else:
        assert outcome == "error" and message in detail, detail
