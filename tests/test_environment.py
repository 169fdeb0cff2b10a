"""Tests for reprokit.environment (and portable._jax_config): privacy of the snapshot, config replay, diffs.

Anything that changes jax's global config or XLA_FLAGS runs in a fresh
interpreter, so this process keeps jax's defaults for the other tests.
"""

from __future__ import annotations

import copy
import getpass
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from reprokit._errors import ReplayError
from reprokit.environment._config import check_xla_flags, replayable_xla_flags
from reprokit.environment._diff import (
    ABSENT,
    diff_environments,
    format_environment_summary,
    format_environment_table,
)
from reprokit.environment._scrub import scrub_text
from reprokit.environment._snapshot import capture_environment, jax_config_snapshot
from reprokit.portable._jax_config import PATH_PLACEHOLDER, restorable_config_items

REPO_ROOT = Path(__file__).resolve().parents[1]
VALID_FLAG = "--xla_cpu_enable_fast_math=false"
UNKNOWN_FLAG = "--xla_this_flag_does_not_exist=1"
# Names shorter than this, or generic ones, are only scrubbed where they stand
# alone (see scrub_text), so the tests look for them only there.
GENERIC = {"root", "user", "admin", "ubuntu", "runner", "localhost"}


def _run_python(code: str, env: dict[str, str] | None = None, stdin: str = "") -> str:
    """Run `code` in a fresh interpreter that can import reprokit; return stdout."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _appears(name: str, text: str) -> bool:
    if len(name) >= 4 and name.lower() not in GENERIC:
        return name.lower() in text.lower()
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text, re.IGNORECASE) is not None


def test_capture_in_subprocess_leaks_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home-of-q7zwriter"
    home.mkdir()
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYq7z",
        "HF_TOKEN": "hf_q7zQwErTyUiOpAsDfGhJkLzXcVbNm1234",
        "GITHUB_TOKEN": "ghp_q7z0123456789abcdefghijABCDEFGHIJ",
        "WANDB_API_KEY": "q7zwandb0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    }
    # getpass.getuser() reads LOGNAME first, so the child's user name is this
    # distinctive one; the real account here may be "root", which names nobody
    # and is deliberately not scrubbed (nor looked for).
    user = "q7zuser-alice"
    host = socket.gethostname()
    env = dict(os.environ)
    env.update(secrets)
    env.update(
        HOME=str(home),
        USER=user,
        LOGNAME=user,
        JAX_COMPILATION_CACHE_DIR=f"{home}/jax-cache",
        # XLA aborts on an unknown "--flag" but ignores bare words after the
        # first flag, so free text can only hide there or in a flag's value.
        XLA_FLAGS=(
            f"{VALID_FLAG} --xla_dump_to={home}/dumps"
            " --xla_dump_hlo_module_re=password=hunter2xyz password=hunter2abc"
        ),
        # Allow-listed and ignored by a CPU backend: a carrier for private text.
        TPU_ACCELERATOR_TYPE=f"v4-8:{host}:{user}:{secrets['HF_TOKEN']}:{home}",
    )
    out = _run_python(
        """
        import json
        from reprokit.environment._snapshot import capture_environment
        print(json.dumps(capture_environment()))
        """,
        env=env,
    )
    snapshot = json.loads(out)

    for name, value in secrets.items():
        assert value not in out, name
        assert name not in out, name
    assert "hunter2" not in out
    assert str(home) not in out and home.name not in out
    assert user not in out and "q7zuser" not in out
    real_user = getpass.getuser()
    if len(real_user) >= 4 and real_user not in GENERIC:
        assert real_user not in out
    assert not _appears(host, out), host

    assert VALID_FLAG in snapshot["xla_flags"]
    assert f"--xla_dump_to={PATH_PLACEHOLDER}" in snapshot["xla_flags"]
    assert "--xla_dump_hlo_module_re=password=<redacted>" in snapshot["xla_flags"]
    assert snapshot["xla_flags_dropped"] == 1
    assert snapshot["env_vars"]["XLA_FLAGS"] == " ".join(snapshot["xla_flags"])
    assert snapshot["env_vars"]["JAX_COMPILATION_CACHE_DIR"] == PATH_PLACEHOLDER
    assert snapshot["jax_config"]["jax_compilation_cache_dir"] == PATH_PLACEHOLDER
    assert snapshot["env_vars"]["TPU_ACCELERATOR_TYPE"].startswith("v4-8:")
    assert snapshot["packages"]["jax"] == jax.__version__
    assert snapshot["backend"]["platform"] == jax.default_backend()


def test_xla_flags_from_a_flag_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag_file = tmp_path / "q7z-flags.txt"
    flag_file.write_text(f"{VALID_FLAG}\n--xla_dump_to={tmp_path}/d\nsecret words\n")
    monkeypatch.setenv("XLA_FLAGS", str(flag_file))
    snapshot = capture_environment()
    assert snapshot["xla_flags"] == [VALID_FLAG, f"--xla_dump_to={PATH_PLACEHOLDER}"]
    assert snapshot["xla_flags_dropped"] == 2
    assert "q7z-flags" not in json.dumps(snapshot)


def test_capture_in_process_is_json_safe_and_fast() -> None:
    import time

    capture_environment()  # first call may initialise the backend
    start = time.perf_counter()
    snapshot = capture_environment()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.2, elapsed
    assert json.loads(json.dumps(snapshot, allow_nan=False)) == snapshot
    assert set(snapshot["jax_config"]) == set(jax.config.values)
    # IntEnum options are recorded by name, not as their integer.
    assert snapshot["jax_config"]["jax_explicit_x64_dtypes"] == "WARN"
    for name in ("jax", "jaxlib", "penzai", "numpy", "ml_dtypes", "reprokit"):
        assert name in snapshot["packages"]


def test_scrub_text_replaces_private_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/tmp/q7z-home")
    monkeypatch.setenv("USER", "q7zalice")
    monkeypatch.setenv("LOGNAME", "q7zalice")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-q7z-0123456789")
    text = (
        "open /tmp/q7z-home/data/x.npy by q7zalice on q7zalice_runs; "
        "key tok-q7z-0123456789; password=hunter2xyz api_key: abc123 "
        "https://bob:pw@example.com Authorization: Bearer abcdefghijkl "
        "GPU-8a3b1c2d-1234-5678-9abc-def012345678 KeyError: 3 max_tokens=5"
    )
    scrubbed = scrub_text(text)
    for private in ("q7z-home", "q7zalice", "tok-q7z", "hunter2xyz", "abc123", "bob:pw"):
        assert private not in scrubbed, private
    assert "abcdefghijkl" not in scrubbed and "8a3b1c2d" not in scrubbed
    assert "<home>/data/x.npy" in scrubbed
    assert "by <user> on <user>_runs" in scrubbed
    # Words that merely contain a secret-looking key are left alone.
    assert "KeyError: 3" in scrubbed and "max_tokens=5" in scrubbed
    assert scrub_text(scrubbed) == scrubbed


def test_scrub_text_is_linear_on_long_text() -> None:
    import time

    # Exception messages can hold huge reprs; no rule may backtrack on them.
    start = time.perf_counter()
    for text in ("a-" * 50_000, "x." * 50_000 + "token=abc", "a:" * 50_000):
        scrub_text(text)
    assert time.perf_counter() - start < 1.0


def test_scrub_text_short_user_name_only_as_whole_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USER", "a")
    monkeypatch.setenv("LOGNAME", "a")
    scrubbed = scrub_text("/data/a/x.npy --xla_a=1 data_a cat a.b")
    assert scrubbed == "/data/<user>/x.npy --xla_a=1 data_a cat a.b"


def test_apply_jax_config_round_trip_in_fresh_processes() -> None:
    recorded = _run_python(
        """
        import json
        import jax
        from jax._src.config import ExplicitX64Mode
        from reprokit.environment._snapshot import jax_config_snapshot
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")
        jax.config.update("jax_explicit_x64_dtypes", ExplicitX64Mode.ALLOW)
        print(json.dumps(jax_config_snapshot()))
        """
    )
    config = json.loads(recorded)
    assert config["jax_explicit_x64_dtypes"] == "ALLOW"
    config["jax_this_option_does_not_exist"] = True
    config["jax_numpy_rank_promotion"] = "bogus"
    config["jax_default_prng_impl"] = "<user>-prng"
    # Machine settings must be skipped: applying this would break the replay.
    config["jax_platforms"] = "tpu"
    # A real option reprokit has not reviewed is reported, never applied.
    config["jax_cpu_enable_async_dispatch"] = False
    replayed = _run_python(
        """
        import json, sys
        import jax
        import jax.numpy as jnp
        from reprokit.portable._jax_config import apply_jax_config
        problems = apply_jax_config(json.load(sys.stdin))
        values = jax.config.values
        mode = values["jax_explicit_x64_dtypes"]
        print(json.dumps({
            "problems": problems,
            "x64": values["jax_enable_x64"],
            "precision": values["jax_default_matmul_precision"],
            "mode": [type(mode).__name__, mode.name],
            "platforms": values["jax_platforms"],
            "async": values["jax_cpu_enable_async_dispatch"],
            "dtype": str(jnp.ones(2).dtype),
        }))
        """,
        stdin=json.dumps({"jax_config": config}),
    )
    result = json.loads(replayed)
    assert result["x64"] is True
    assert result["precision"] == "highest"
    assert result["mode"] == ["ExplicitX64Mode", "ALLOW"]
    assert result["platforms"] is None
    assert result["async"] is True
    assert result["dtype"] == "float64"
    problems = result["problems"]
    assert len(problems) == 4, problems
    assert any("jax_cpu_enable_async_dispatch" in p and "not applied" in p for p in problems)
    assert any("jax_default_prng_impl" in p and "private text" in p for p in problems)
    assert any("jax_this_option_does_not_exist" in p and "unknown" in p for p in problems)
    assert any("jax_numpy_rank_promotion" in p for p in problems)


def test_restorable_config_items_skip_machine_settings() -> None:
    config = jax_config_snapshot()
    items = restorable_config_items({"jax_config": config})
    assert next(iter(items)) == "jax_enable_x64"
    for name in (
        "jax_compilation_cache_dir",
        "jax_platforms",
        "jax_log_compiles",
        "jax_num_cpu_devices",
        "jax_cpu_collectives_implementation",
        "jax_enable_pgle",
        "jax_traceback_filtering",
        "jax_cpu_enable_async_dispatch",
    ):
        assert name not in items, name
    # The archive is untrusted: an option this list has not reviewed is never applied.
    unreviewed = restorable_config_items({"jax_future_option": True, "jax_debug_nans": True})
    assert unreviewed == {"jax_debug_nans": True}
    for name in (
        "jax_default_matmul_precision",
        "jax_threefry_partitionable",
        "jax_default_prng_impl",
        "jax_numpy_dtype_promotion",
        "jax_explicit_x64_dtypes",
        "jax_disable_jit",
        "jax_debug_nans",
    ):
        assert name in items, name


def test_diff_shows_exactly_the_changed_config() -> None:
    before = capture_environment()
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        after = capture_environment()
    diffs = diff_environments(before, after)
    assert [(d.field, d.recorded, d.current, d.version_sensitive) for d in diffs] == [
        ("jax_config.jax_default_matmul_precision", None, "highest", True),
        ("jax_config.jax_enable_x64", False, True, True),
    ]
    assert "jax_enable_x64=True" in format_environment_summary(after)
    assert "numerics config: jax defaults" in format_environment_summary(before)

    # Non-numeric differences come after the version-sensitive ones.
    current = copy.deepcopy(after)
    current["jax_config"]["jax_log_compiles"] = True
    current["packages"]["jax"] = "0.0.1"
    del current["env_vars"]
    before["env_vars"] = {"JAX_PLATFORMS": "cpu"}
    diffs = diff_environments(before, current)
    fields = [d.field for d in diffs]
    assert fields == [
        "jax_config.jax_default_matmul_precision",
        "jax_config.jax_enable_x64",
        "packages.jax",
        "env_vars.JAX_PLATFORMS",
        "jax_config.jax_log_compiles",
    ]
    assert diffs[3].current == ABSENT

    table = format_environment_table(diffs).splitlines()
    assert table[0].split(" | ")[0].strip() == "field"
    assert table[-1] == "* may change numerical results"
    bars = {tuple(m.start() for m in re.finditer(r" \| ", line)) for line in table[2:-1]}
    assert len(bars) == 1, table
    assert any(line.startswith("packages.jax *") and "0.0.1" in line for line in table)
    assert format_environment_table([]).startswith("The environment matches")


def test_check_xla_flags_in_subprocesses() -> None:
    assert check_xla_flags([]) == ([], [])
    dump = f"--xla_dump_to={PATH_PLACEHOLDER}"
    accepted, rejected = check_xla_flags([VALID_FLAG, UNKNOWN_FLAG, "--password=hunter2", dump])
    assert accepted == [VALID_FLAG]
    assert sorted(rejected) == sorted([UNKNOWN_FLAG, "--password=hunter2", dump])
    # This process survived and still computes.
    assert float(jax.numpy.ones(3).sum()) == 3.0


def test_check_xla_flags_accepts_all_in_one_run() -> None:
    flags = [VALID_FLAG, "--xla_force_host_platform_device_count=2"]
    assert check_xla_flags(flags) == (flags, [])


def test_check_xla_flags_raises_when_jax_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # The child inherits this environment; no such platform means no backend,
    # with or without flags, so the flags cannot be judged.
    monkeypatch.setenv("JAX_PLATFORMS", "no_such_platform")
    with pytest.raises(ReplayError, match="fails even without XLA_FLAGS"):
        check_xla_flags([UNKNOWN_FLAG])


def test_replayable_xla_flags_drop_placeholders() -> None:
    keep, drop = replayable_xla_flags(
        [VALID_FLAG, f"--xla_dump_to={PATH_PLACEHOLDER}", "--xla_foo=<home>/x"]
    )
    assert keep == [VALID_FLAG]
    assert drop == [f"--xla_dump_to={PATH_PLACEHOLDER}", "--xla_foo=<home>/x"]
