"""`reprokit bisect`: the search on its own, then real bisections across jax releases.

The search logic is tested with a replay function of our own (a table of
outcomes per release), no environments. The real tests pack a layer that
hits a documented jax change with the installed jax, build environments for
older releases with uv (from the package index; skipped, with the reason,
when it cannot be reached), and bisect for real.

The change: `jax.numpy.clip` accepted the deprecated `a_min`/`a_max`
keywords (with a DeprecationWarning, since jax 0.4.27) up to jax 0.9.2;
jax 0.10.0 removed them, so `clip(x, a_min=0.0)` raises
`TypeError: clip() got an unexpected keyword argument 'a_min'`. A penzai
`Elementwise(functools.partial(jnp.clip, a_min=0.0))` layer exhibits it:
introduced in 0.10.0, last good 0.9.2.

Cost: three environments (jaxlib wheels ~80 MB each, downloaded once into
uv's cache, which later runs reuse); see the README for measured times.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_reprokit, subprocess_env

from reprokit._errors import ArchiveError, ReplayError, UsageError
from reprokit.bisecting import _bisect, _environments
from reprokit.bisecting._bisect import (
    CANNOT_REPLAY,
    NOT_REPRODUCED,
    REPRODUCED,
    BisectRow,
    conclude,
    parse_versions,
    search,
)

# ------------------------------------------------------------------ the search, with our own replay function

VERSIONS = [f"0.{minor}.0" for minor in range(1, 11)]  # 0.1.0 ... 0.10.0


class TableReplay:
    """Replays by looking the outcome up; remembers the order releases were tried in."""

    def __init__(self, outcomes: dict[str, str]):
        self.outcomes = outcomes
        self.tried: list[str] = []

    def __call__(self, version: str) -> BisectRow:
        self.tried.append(version)
        status = self.outcomes[version]
        reason = "cannot install: no wheel" if status == CANNOT_REPLAY else ""
        return BisectRow(version, status, {"jaxlib": version}, reason=reason, error=reason)


def _bisect_table(outcomes: dict[str, str], exhaustive: bool = False, latest: str | None = None):
    replay = TableReplay(outcomes)
    versions = sorted(outcomes, key=_environments.version_key)
    rows = search(versions, replay, exhaustive=exhaustive)
    return replay, rows, conclude("jax", versions, rows, latest=latest, exhaustive=exhaustive)


def _introduced_at(change: str) -> dict[str, str]:
    at = VERSIONS.index(change)
    return {v: (REPRODUCED if i >= at else NOT_REPRODUCED) for i, v in enumerate(VERSIONS)}


@pytest.mark.parametrize("change", VERSIONS[1:])
def test_search_finds_the_one_change_point_with_both_ends_first(change):
    replay, rows, summary = _bisect_table(_introduced_at(change), latest=VERSIONS[-1])
    assert replay.tried[:2] == [VERSIONS[0], VERSIONS[-1]]
    assert summary["first_bad"] == change
    assert summary["last_good"] == VERSIONS[VERSIONS.index(change) - 1]
    assert summary["conclusive"] is True
    # Binary search: both ends plus ceil(log2(8 releases between)).
    assert len(replay.tried) <= 2 + 4
    assert [row.version for row in rows] == sorted(replay.tried, key=_environments.version_key)


def test_conclusion_in_plain_words_for_a_fix():
    outcomes = {v: (REPRODUCED if i < 4 else NOT_REPRODUCED) for i, v in enumerate(VERSIONS)}
    _, _, summary = _bisect_table(outcomes)
    assert summary["conclusion"] == "reproduces on jax 0.1.0–0.4.0; fixed in 0.5.0 (first good)"
    assert (summary["change"], summary["first_good"], summary["last_bad"]) == (
        "fixed",
        "0.5.0",
        "0.4.0",
    )


def test_conclusion_when_nothing_changes():
    _, rows, summary = _bisect_table(dict.fromkeys(VERSIONS, REPRODUCED), latest="0.10.0")
    assert len(rows) == 2  # the ends agree: with one change point assumed, that is all
    assert (
        summary["conclusion"]
        == "reproduces on every jax release tried (0.1.0–0.10.0), latest included"
    )
    _, _, summary = _bisect_table(dict.fromkeys(VERSIONS, NOT_REPRODUCED))
    assert summary["conclusion"] == "does not reproduce on any jax release tried (0.1.0–0.10.0)"
    assert summary["conclusive"] is True


def test_introduced_names_the_last_good_release():
    _, _, summary = _bisect_table(_introduced_at("0.6.0"), latest="0.10.0")
    assert summary["conclusion"] == (
        "introduced in jax 0.6.0 (last good 0.5.0); reproduces on 0.6.0–0.10.0, latest included"
    )


def test_releases_that_cannot_replay_are_skipped_not_counted():
    outcomes = _introduced_at("0.6.0")
    outcomes.update({"0.1.0": CANNOT_REPLAY, "0.10.0": CANNOT_REPLAY, "0.5.0": CANNOT_REPLAY})
    replay, rows, summary = _bisect_table(outcomes)
    # The ends that cannot replay are passed over, inward, before anything else.
    assert replay.tried[:4] == ["0.1.0", "0.2.0", "0.10.0", "0.9.0"]
    assert summary["first_bad"] == "0.6.0"
    assert summary["last_good"] == "0.4.0"
    # 0.5.0 sits between the last good and the first bad: the change cannot be pinned to one.
    assert summary["conclusive"] is False
    assert "0.5.0" in summary["conclusion"] and "could not be replayed" in summary["conclusion"]
    assert all(row.status == CANNOT_REPLAY for row in rows if row.version in ("0.1.0", "0.5.0"))


def test_nothing_replayable_is_not_conclusive():
    _, rows, summary = _bisect_table(dict.fromkeys(VERSIONS[:3], CANNOT_REPLAY))
    assert len(rows) == 3 and summary["change"] is None and not summary["conclusive"]
    result = _bisect.BisectResult(
        "a.repro.zip", "jax", tuple(VERSIONS[:3]), tuple(rows), False, **summary
    )
    assert result.exit_code == 5


def test_all_reports_more_than_one_change_as_inconclusive():
    outcomes = _introduced_at("0.4.0")
    outcomes["0.8.0"] = NOT_REPRODUCED
    replay, rows, summary = _bisect_table(outcomes, exhaustive=True)
    assert replay.tried == VERSIONS and len(rows) == 10
    assert summary["change"] == "several" and summary["conclusive"] is False
    assert "changes 3 times" in summary["conclusion"]


def test_result_table_json_and_exit_code():
    replay, rows, summary = _bisect_table(_introduced_at("0.3.0"))
    result = _bisect.BisectResult(
        "x.repro.zip", "jax", tuple(VERSIONS), tuple(rows), False, **summary
    )
    text = result.format()
    assert text.splitlines()[1].split()[:3] == ["jax", "installed", "reproduced"]
    assert "introduced in jax 0.3.0 (last good 0.2.0)" in text
    assert "assumes the outcome changes at most once" in text
    data = json.loads(json.dumps(result.as_dict()))
    assert data["first_bad"] == "0.3.0" and data["exit_code"] == 0
    assert [row["version"] for row in data["rows"]] == [row.version for row in rows]


def test_parse_versions():
    available = ["0.4.34", "0.4.35", "0.4.36", "0.5.0", "0.10.0"]
    assert parse_versions("0.4.35..latest", available) == ["0.4.35", "0.4.36", "0.5.0", "0.10.0"]
    assert parse_versions("0.4.35..0.5.0", available) == ["0.4.35", "0.4.36", "0.5.0"]
    assert parse_versions("0.5.0..", available) == ["0.5.0", "0.10.0"]
    assert parse_versions("0.10.0, 0.4.35 0.5.0", None) == ["0.4.35", "0.5.0", "0.10.0"]
    for bad in ("0.4.35rc1", "latest", "0.4.35..banana"):
        with pytest.raises(UsageError):
            parse_versions(bad, available)
    with pytest.raises(UsageError):
        parse_versions("0.11.0..latest", available)


def test_requirements_pin_jaxlib_only_where_it_exists():
    jaxlibs = {"0.4.35", "0.4.36"}
    assert _environments.requirements("jax", "0.4.35", jaxlibs)[:2] == [
        "jax==0.4.35",
        "jaxlib==0.4.35",
    ]
    assert _environments.requirements("jax", "0.4.37", jaxlibs)[:2] == ["jax==0.4.37", "jaxlib"]
    assert "numpy<2" in _environments.requirements("jax", "0.4.23", jaxlibs)
    assert "penzai==0.2.4" in _environments.requirements("penzai", "0.2.4")
    with pytest.raises(UsageError):
        _environments.requirements("torch", "2.0.0")


def test_unreachable_index_is_one_clear_line():
    with pytest.raises(ReplayError) as caught:
        _environments.list_versions("jax", "http://127.0.0.1:9/simple", timeout=5)
    message = str(caught.value)
    assert "\n" not in message and "cannot reach the package index" in message


def test_missing_uv_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "uv", None)  # `import uv` fails, as when it is not installed
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ReplayError, match="pip install uv"):
        _environments.find_uv()


def test_index_credentials_are_never_printed():
    assert (
        _environments._public_url("https://me:s3cret@example.org/simple")
        == "https://example.org/simple"
    )


# ------------------------------------------------------------------ rendering from the verified record


@pytest.fixture(scope="module")
def clip_archive(tmp_path_factory):
    """A layer whose call raises under jax >= 0.10.0 (`jnp.clip(..., a_min=...)`), packed here."""
    import jax.numpy as jnp
    from penzai import pz

    import reprokit

    model = pz.nn.Sequential([pz.nn.Elementwise(functools.partial(jnp.clip, a_min=0.0))])
    selection = pz.select(model).at_instances_of(pz.nn.Elementwise).pick_nth_selected(0)
    out = tmp_path_factory.mktemp("bisect") / "clip.repro.zip"
    result = reprokit.pack(selection, jnp.arange(-2.0, 2.0), out=out, check=False)
    assert result.signature["type"] == "builtins.TypeError"
    return str(out)


def test_archive_text_stays_in_comments(clip_archive):
    from reprokit.archive._open import open_archive

    opened = open_archive(clip_archive, allow_modules=())
    opened.close()
    manifest = dict(opened.manifest)
    manifest["layer"] = {**manifest["layer"], "type": "X\nimport os; os.system('touch pwned')"}
    manifest["layer"]["flax_path"] = "Dense_0\nprint('pwned')"
    manifest["created"] = "today\nprint('pwned')"
    script = _bisect.render_script(manifest, opened.structure)
    statements = [line for line in script.splitlines() if "pwned" in line]
    assert statements and all(line.startswith("#") for line in statements)
    compile(script, "replay.py", "exec")


def test_invalid_archive_is_refused_before_any_environment(tmp_path):
    bogus = tmp_path / "bogus.repro.zip"
    bogus.write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(ArchiveError):
        _bisect.bisect(bogus, versions="0.10.0", cache_dir=tmp_path / "cache")
    done = run_reprokit("bisect", bogus, "--versions", "0.10.0")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("reprokit: error:")


# ------------------------------------------------------------------ real bisections (package index needed)


@pytest.fixture(scope="module")
def index_available():
    try:
        return _environments.list_versions("jax", _environments.configured_index_url(), timeout=20)
    except (ReplayError, UsageError) as error:
        pytest.skip(f"the package index cannot be reached, so no environment can be built: {error}")


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory):
    """reprokit's environment cache for this run, laid out as under `XDG_CACHE_HOME`.

    uv's own cache (the wheels) is the user's, reused across runs.
    """
    cache = tmp_path_factory.mktemp("xdg") / "reprokit" / "bisect"
    cache.mkdir(parents=True)
    return cache


def _uv_cache_dir() -> str:
    done = subprocess.run(
        [_environments.find_uv(), "cache", "dir"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_bisect_finds_the_jax_release_that_removed_clip_a_min(
    clip_archive, index_available, env_cache
):
    assert {"0.9.2", "0.10.0", "0.10.1", "0.10.2"} <= set(index_available)
    result = _bisect.bisect(clip_archive, versions="0.9.2..0.10.2", cache_dir=env_cache)
    assert result.versions == ("0.9.2", "0.10.0", "0.10.1", "0.10.2")
    tried = [row.version for row in result.rows]
    assert len(tried) >= 3 and "0.9.2" in tried and "0.10.2" in tried
    assert result.first_bad == "0.10.0" and result.last_good == "0.9.2"
    assert result.conclusive and result.exit_code == 0
    assert result.conclusion.startswith("introduced in jax 0.10.0 (last good 0.9.2)")
    good = result.row("0.9.2")
    assert good.status == NOT_REPRODUCED and good.installed["jaxlib"] == "0.9.2"
    bad = result.row("0.10.0")
    assert bad.status == REPRODUCED and "a_min" in bad.error
    assert bad.installed["jaxlib"] == "0.10.0" and "penzai" in bad.installed


def test_altered_replay_py_never_runs(clip_archive, index_available, env_cache, tmp_path):
    from fuzzer import read_members, replace_member, write_members

    marker = tmp_path / "reporter-code-ran"
    members = read_members(clip_archive)
    original = next(m.data for m in members if m.name == "replay.py")
    evil = f"open({str(marker)!r}, 'w').write('ran')\n".encode() + original
    altered = tmp_path / "altered.repro.zip"
    write_members(replace_member(members, "replay.py", evil), altered)
    # The CLI finds the environments the tests above built through XDG_CACHE_HOME.
    env = subprocess_env(XDG_CACHE_HOME=str(env_cache.parents[1]), UV_CACHE_DIR=_uv_cache_dir())
    done = run_reprokit(
        "bisect", altered, "--versions", "0.10.0,0.10.2", "--json", env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [row["status"] for row in result["rows"]] == [REPRODUCED, REPRODUCED]
    assert result["conclusion"].startswith("reproduces on every jax release tried (0.10.0–0.10.2)")
    assert not marker.exists()
    # The environments went to the cache named by XDG_CACHE_HOME, keyed by their resolved set.
    built = os.listdir(env_cache)
    assert any(name.startswith("jax-0.10.0-py") for name in built)
    assert not any(name.startswith(".building-") for name in built)


def test_a_release_that_cannot_install_is_skipped(clip_archive, index_available, env_cache):
    result = _bisect.bisect(clip_archive, versions="0.9.2,0.10.0,0.10.99", cache_dir=env_cache)
    missing = result.row("0.10.99")
    assert missing.status == CANNOT_REPLAY and missing.reason.startswith("cannot install")
    assert "0.10.99" in missing.reason
    # The upper end could not be installed: the next one inward took its place.
    assert result.first_bad == "0.10.0" and result.last_good == "0.9.2"
    assert result.conclusive and result.exit_code == 0


def test_a_release_missing_a_function_of_the_layer_cannot_rebuild(
    index_available, env_cache, tmp_path
):
    """`jax.lax.mulhi` is new after jax 0.10.0: the record cannot be rebuilt there."""
    import jax
    import jax.numpy as jnp
    from penzai import pz

    import reprokit

    layer = pz.nn.Elementwise(functools.partial(jax.lax.mulhi, jnp.int32(3)))
    selection = pz.select(pz.nn.Sequential([layer])).at_instances_of(pz.nn.Elementwise)
    out = tmp_path / "mulhi.repro.zip"
    x = jnp.arange(4, dtype=jnp.int32) * 2**30
    reprokit.pack(selection.pick_nth_selected(0), x, out=out, check=False)
    result = _bisect.bisect(out, versions="0.10.0,0.10.2", cache_dir=env_cache)
    old = result.row("0.10.0")
    assert old.status == CANNOT_REPLAY
    assert old.reason.startswith("cannot rebuild or run the layer") and "mulhi" in old.reason
    new = result.row("0.10.2")
    assert new.status == REPRODUCED and new.output_bitwise_equal is True
    assert result.conclusion == (
        "reproduces on jax 0.10.2, the only release tried that could be replayed"
    )


def test_a_penzai_release_without_the_layer_class_cannot_rebuild(
    index_available, env_cache, tmp_path
):
    """`pz.nn.TanhSoftCap` first appeared in penzai 0.2.1."""
    import jax.numpy as jnp
    from penzai import pz

    import reprokit

    model = pz.nn.Sequential([pz.nn.TanhSoftCap(soft_cap=2.0)])
    selection = pz.select(model).at_instances_of(pz.nn.TanhSoftCap).pick_nth_selected(0)
    out = tmp_path / "softcap.repro.zip"
    reprokit.pack(selection, jnp.linspace(-5.0, 5.0, 8), out=out, check=False)
    result = _bisect.bisect(out, package="penzai", versions="0.2.0,0.2.1", cache_dir=env_cache)
    old = result.row("0.2.0")
    assert old.status == CANNOT_REPLAY and old.installed["penzai"] == "0.2.0"
    assert old.reason.startswith("cannot rebuild or run the layer") and "TanhSoftCap" in old.reason
    assert result.row("0.2.1").status == REPRODUCED
    assert result.conclusion.startswith("reproduces on penzai 0.2.1, the only release")


def test_ctrl_c_leaves_the_environment_cache_consistent(clip_archive, index_available, tmp_path):
    cache = tmp_path / "cache"
    script = (
        "from reprokit.bisecting._bisect import bisect\n"
        f"bisect({clip_archive!r}, versions='0.9.2', cache_dir={str(cache)!r})\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    # Interrupt while the environment is being built.
    while time.monotonic() < deadline and not list(cache.glob(".building-*")):
        time.sleep(0.05)
    assert list(cache.glob(".building-*")), "the build never started"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr
    left = os.listdir(cache)
    assert not any(name.startswith(".building-") for name in left)
    # Whatever is under a real key is complete (the rename is the last step).
    for name in left:
        assert (cache / name / "reprokit-environment.json").is_file()


def test_a_release_that_raises_another_error_is_flagged():
    rows = (
        BisectRow("0.1.0", NOT_REPRODUCED, error="builtins.TypeError: something else"),
        BisectRow("0.2.0", REPRODUCED, error="builtins.ValueError: the recorded one"),
    )
    summary = conclude("jax", ["0.1.0", "0.2.0"], rows)
    result = _bisect.BisectResult("a.repro.zip", "jax", ("0.1.0", "0.2.0"), rows, False, **summary)
    assert result.notes and result.notes[0].startswith("on 0.1.0 the layer raised an error other")
    assert "note: on 0.1.0" in result.format()
    assert result.as_dict()["notes"] == list(result.notes)


def test_offline_replays_only_cached_environments(clip_archive, index_available, env_cache):
    """Runs last: the tests above built jax 0.9.2, 0.10.0 and 0.10.2 in this cache."""
    result = _bisect.bisect(clip_archive, offline=True, cache_dir=env_cache)
    assert {"0.9.2", "0.10.0", "0.10.2"} <= set(result.versions)
    assert result.first_bad == "0.10.0" and result.last_good == "0.9.2"
    assert result.latest is None  # offline: the index was not asked


def test_requirements_add_flax_for_a_flax_record():
    assert _environments.requirements("jax", "0.10.0", {"0.10.0"}, ("flax",))[-1] == "flax"


def test_recorded_xla_flags_that_bisect_does_not_set_are_noted():
    rows = (BisectRow("0.1.0", REPRODUCED),)
    summary = conclude("jax", ["0.1.0"], rows)
    result = _bisect.BisectResult(
        "a.repro.zip",
        "jax",
        ("0.1.0",),
        rows,
        False,
        unset_xla_flags=("--xla_cpu_fast_math=true",),
        **summary,
    )
    assert any("--xla_cpu_fast_math=true" in note for note in result.notes)
