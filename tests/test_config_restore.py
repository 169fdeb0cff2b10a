"""replay.py restores the recorded jax config with the library's own code, and gets its answers.

`reprokit run` calls `reprokit.portable._jax_config.apply_jax_config`; the
archive's standalone `replay.py` embeds that module verbatim and its
`restore_config` calls the same function. These tests check both halves of
that claim: the script carries the library's source (no second
implementation to drift), and on a table of recorded configs (reviewed
options, unreviewed ones, enum values, malformed and machine entries) the
script run in a fresh interpreter applies and reports exactly what the
library does in another.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
from conftest import TESTS, run_python, subprocess_env

from reprokit.archive import _format
from reprokit.portable import _jax_config
from reprokit.record._encoding import unpack_bytes
from reprokit.views._script import render_replay_script

_PACK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import models
    from penzai import pz
    import reprokit
    model = models.mlp()
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    reprokit.pack(selection, models.mlp_input(), out={out!r})
    """
)

# What each side prints: the problems it reported and, for every recorded
# name jax knows, the value in force afterwards (enums by class and name).
_REPORT = """
def _shown(value):
    return f"{type(value).__name__}.{value.name}" if hasattr(value, "name") else repr(value)

def _report(problems, names):
    values = jax.config.values
    print(json.dumps({
        "problems": problems,
        "values": {name: _shown(values[name]) for name in names if name in values},
    }))
"""

_LIBRARY = (
    "import json, sys\nimport jax\n"
    + _REPORT
    + """
from reprokit.portable._jax_config import apply_jax_config
config = json.load(sys.stdin)
_report(apply_jax_config(config), sorted(config))
"""
)

_SCRIPT = (
    "import json, runpy, sys\nimport jax\n"
    + _REPORT
    + """
config = json.load(sys.stdin)
script = runpy.run_path(sys.argv[1], run_name="replay")
_report(script["restore_config"](), sorted(config))
"""
)

# Recorded `jax_config` sections, as a hostile or merely old archive may hold them.
_CASES = {
    "reviewed": {"jax_enable_x64": True, "jax_default_matmul_precision": "highest"},
    "enums": {
        "jax_explicit_x64_dtypes": "ALLOW",  # recorded by name
        "jax_legacy_prng_key": "error",  # an enum's value, as hand edits hold it
        "jax_numpy_dtype_promotion": "STRICT",
        "jax_send_traceback_to_runtime": "FULL",  # machine setting: never applied
    },
    "unreviewed": {
        "jax_cpu_enable_async_dispatch": False,
        "jax_this_option_does_not_exist": True,
        "jax_enable_x64": False,  # reviewed, equal to jax's default: silent
    },
    "malformed": {
        "jax_numpy_rank_promotion": "bogus",
        "jax_default_prng_impl": "<user>-prng",
        "jax_explicit_x64_dtypes": "NOPE",
        "jax_enable_x64": {"type": "object"},
        "jax_exec_time_optimization_effort": "not a number",
        "jax_random_seed_offset": "x" * 500,
        "jax_" + "y" * 300: 1,
    },
    "non-finite and machine": {
        "jax_exec_time_optimization_effort": "nan",
        "jax_platforms": "tpu",
        "jax_compilation_cache_dir": "<path>",
        "jax_default_matmul_precision": "/home/someone/precision",
    },
}

# What the fully applicable cases leave in force, as `_report` shows it.
_APPLIED = {
    "reviewed": {"jax_enable_x64": "True", "jax_default_matmul_precision": "'highest'"},
    "enums": {
        "jax_explicit_x64_dtypes": "ExplicitX64Mode.ALLOW",
        "jax_legacy_prng_key": "LegacyPrngKeyState.ERROR",
        "jax_numpy_dtype_promotion": "NumpyDtypePromotion.STRICT",
        "jax_send_traceback_to_runtime": "RuntimeTracebackMode.OFF",
    },
    # NaN is recorded as the string "nan"; machine entries are skipped, silently.
    "non-finite and machine": {
        "jax_exec_time_optimization_effort": "nan",
        "jax_compilation_cache_dir": "None",
        "jax_default_matmul_precision": "None",
    },
}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A real archive's manifest and structure, to render replay.py from."""
    out = tmp_path_factory.mktemp("config") / "mlp.repro.zip"
    result = run_python(_PACK.format(tests=str(TESTS), out=str(out)))
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(out) as archive:
        manifest = json.loads(archive.read(_format.MANIFEST))
        tree = unpack_bytes(archive.read(_format.STRUCTURE))
    return manifest, tree


def _run(code: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with `stdin` as its input."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )


def _render(packed, jax_config: dict) -> str:
    manifest, tree = packed
    manifest = {**manifest, "environment": {**manifest["environment"], "jax_config": jax_config}}
    return render_replay_script(manifest, tree)


def test_replay_script_embeds_the_library_restore_verbatim(packed):
    script = _render(packed, _CASES["reviewed"])
    for function in (
        _jax_config.apply_jax_config,
        _jax_config.restorable_config_items,
        _jax_config._decode_config_value,
    ):
        assert inspect.getsource(function) in script
    # The reviewed list is the library's, not a copy that could fall behind.
    assert (
        inspect.getsource(_jax_config).split("_REPLAYED_CONFIG = ")[1].split("\n)\n")[0] in script
    )
    body = script.split("def restore_config():")[1].split("\ndef ")[0]
    assert "return apply_jax_config(JAX_CONFIG)" in body
    assert "jax.config.update" not in body


def test_replay_script_carries_what_the_library_applies_or_reports(packed):
    recorded = {**_CASES["malformed"], **_CASES["non-finite and machine"]}
    namespace: dict = {}
    script = _render(packed, recorded)
    exec(
        script.split("JAX_CONFIG = ")[1].split("\n}\n")[0].join(["JAX_CONFIG = ", "\n}\n"]),
        namespace,
    )
    expected = {
        **_jax_config.restorable_config_items(recorded),
        **_jax_config.unreviewed_config_items(recorded),
    }
    assert namespace["JAX_CONFIG"] == expected
    assert "jax_platforms" not in expected and "jax_compilation_cache_dir" not in expected


@pytest.mark.parametrize("case", sorted(_CASES))
def test_replay_script_restores_exactly_as_the_library(packed, tmp_path, case):
    recorded = _CASES[case]
    script = tmp_path / "replay.py"
    script.write_text(_render(packed, recorded))
    # As the archive holds it: the manifest is written with sorted keys, and
    # replay.py is rendered from the manifest as it reads back.
    stdin = json.dumps(recorded, sort_keys=True)
    library = _run(_LIBRARY, stdin)
    assert library.returncode == 0, library.stderr[-3000:]
    standalone = _run(_SCRIPT, stdin, str(script))
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    ours, theirs = json.loads(library.stdout), json.loads(standalone.stdout)
    assert theirs == ours
    # Equality is not two empty reports: each case takes the path it names.
    if case in _APPLIED:
        assert ours["problems"] == [] and ours["values"] == {**ours["values"], **_APPLIED[case]}
    else:
        assert ours["problems"], case
    for line in ours["problems"]:
        assert len(line) < 400  # the archive chose these names: clipped
