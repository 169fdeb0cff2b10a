"""Each command opens its archive once, under the limits the user gave.

`reprokit run` used to open its archive up to three times (for the recorded
XLA flags, to load it, and again to read the StableHLO artifact), the last
time under default limits whatever the user passed; `pack` reopened the
archive it had just written to render the issue snippet. These tests count
`ArchiveReader` constructions in this process, through click's CliRunner,
and record the limits each reader got. Worker processes (the self-check,
sweep conditions, the float64 reference) open their own copy in their own
process, which these counts do not see.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import TESTS
from test_cli import LINEAR_KEYPATH, SCRIPT

from reprokit._cli import main
from reprokit._workers import limits_from_argv
from reprokit.archive._container import ArchiveReader, Limits

# Not the defaults, so a reader built with default limits is told apart.
USER_LIMITS = ["--max-members", "5000", "--max-member-size", "48M"]
EXPECTED = Limits(max_members=5000, max_small_member_bytes=48 * 2**20)


@pytest.fixture
def opens(monkeypatch):
    """Every `ArchiveReader` built in this process, as (path, limits)."""
    seen: list[tuple[str, Limits | None]] = []
    real = ArchiveReader.__init__

    def counting(self, path, limits=None):
        seen.append((os.fspath(path), limits))
        real(self, path, limits)

    monkeypatch.setattr(ArchiveReader, "__init__", counting)
    return seen


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("target") / "failing.py"
    path.write_text(SCRIPT.format(tests=str(TESTS)))
    return path


@pytest.fixture(scope="module")
def archive(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("archive") / "nan.repro.zip"
    packed = invoke("pack", f"{script}:make_call", "--select", LINEAR_KEYPATH, "-o", out)
    assert packed.exit_code == 0, packed.output
    return str(out)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_pack_never_reopens_the_archive_it_wrote(script, tmp_path, opens):
    out = tmp_path / "nan.repro.zip"
    packed = invoke("pack", f"{script}:make_call", "--select", LINEAR_KEYPATH, "-o", out)
    assert packed.exit_code == 0, packed.output
    # The self-check replayed it in a fresh process; this process read nothing back.
    assert "self-check: reproduced in a fresh process" in packed.output
    assert opens == []
    snippet = (tmp_path / "nan.issue.md").read_text()
    printed = invoke("issue", out)
    assert printed.exit_code == 0 and printed.output == snippet


@pytest.mark.parametrize(
    "extra",
    [[], ["--stablehlo"], ["--repeat", "2", "--reference", "highest"], ["--sweep"]],
    ids=["plain", "stablehlo", "repeat-reference", "sweep"],
)
def test_run_opens_once_with_the_users_limits(archive, opens, extra):
    ran = invoke("run", archive, *USER_LIMITS, *extra)
    assert ran.exit_code == 0, ran.output
    assert opens == [(archive, EXPECTED)]


@pytest.mark.parametrize("extra", [[], ["--json"], ["--quiet"]])
def test_inspect_opens_once_with_the_users_limits(archive, opens, extra):
    shown = invoke("inspect", archive, *USER_LIMITS, *extra)
    assert shown.exit_code == 0, shown.output
    assert opens == [(archive, EXPECTED)]


def test_inspect_html_opens_once_with_the_users_limits(archive, opens, tmp_path):
    shown = invoke("inspect", archive, *USER_LIMITS, "--html", tmp_path / "view.html")
    assert shown.exit_code == 0, shown.output
    assert opens == [(archive, EXPECTED)]


@pytest.mark.parametrize("command", ["verify", "issue"])
def test_verify_and_issue_open_once_with_the_users_limits(archive, opens, command):
    done = invoke(command, archive, *USER_LIMITS)
    assert done.exit_code == 0, done.output
    assert opens == [(archive, EXPECTED)]


def test_a_limit_the_archive_exceeds_refuses_it_at_the_one_open(archive, opens):
    ran = invoke("run", archive, "--max-members", "3")
    assert ran.exit_code == 3
    assert len(opens) == 1 and opens[0][1].max_members == 3



def test_raised_limits_reach_the_worker_processes(archive, opens, monkeypatch):
    """The sweep's workers and the float64 reference reopen the archive under the user's limits."""
    from reprokit.replaying import _variants

    worker_args: list[list[str]] = []
    real_worker, real_reference = _variants.run_worker, _variants._float64_reference

    def worker(module, args, **kwargs):
        worker_args.append(list(args))
        return real_worker(module, args, **kwargs)

    def reference(path, options):
        worker_args.append(list(options))
        return real_reference(path, options)

    monkeypatch.setattr(_variants, "run_worker", worker)
    monkeypatch.setattr(_variants, "_float64_reference", reference)
    ran = invoke("run", archive, *USER_LIMITS, "--sweep", "--reference", "float64", "--json")
    assert ran.exit_code == 0, ran.output
    assert opens == [(archive, EXPECTED)]
    payload = json.loads(ran.stdout)
    assert payload["reference"]["reference"] == "float64"
    workers = [r for r in payload["sweep"] if r["condition"].startswith(("x64", "StableHLO"))]
    assert len(workers) == 2 and all(r["ran"] for r in workers), workers
    assert len(worker_args) == 3
    for args in worker_args:
        assert limits_from_argv(args) == EXPECTED
        assert "--limit" in args
