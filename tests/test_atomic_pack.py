"""Packing is atomic: a crash leaves the previous file or nothing, never a truncated archive.

`test_sigkill_at_random_points` SIGKILLs packing processes at 50+ random
moments spread over whole packs of a 6 MB layer (capture, encoding,
writing, fsync, rename), then checks the target path: it must be absent, the
previous file byte for byte, or a complete archive that verifies (every CRC)
and loads. Temporary files may survive a SIGKILL (nothing can delete them),
but only under the writers' temp-file names, next to the target: the
archive's, or the issue snippet's once the archive is in place.

To start 50+ processes quickly, one helper process imports jax, penzai and
reprokit once and forks a child per kill point. It forks before jax starts
any backend (no XLA threads exist yet), and each child builds its model and
packs on its own.

After ordinary errors (an exception while writing, a full disk), no
temporary file may remain and the previous file must be untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import run_python, subprocess_env

import reprokit
from reprokit.archive._verify import verify_archive

KILLS = 56
PARALLEL = 4
# pack also writes the issue text next to the archive.
OUR_FILES = ("layer.repro.zip", "layer.issue.md")
TEMP_NAME = re.compile(r"\.(?P<base>.+)\.tmp-[0-9a-f]{12,16}$")

_FORKER = r'''
import json, os, random, shutil, signal, sys, time, zipfile
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
import jax
from penzai import pz
import reprokit
from reprokit.archive import _container as _archive
from reprokit.archive._verify import verify_archive

folder, kills, parallel, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
PACKS = 3
# 6 MB of float32 weights, made before any fork (numpy only: jax's backend
# must not start in this process, or the forked children could deadlock).
WEIGHTS = np.random.default_rng(0).standard_normal((1024, 1536), dtype=np.float32)


def child(target, fd, note_prefix):
    """Builds a 6 MB layer, says ready, then packs it PACKS times, marking each phase."""
    def mark(kind, i):
        os.write(fd, f"{kind}{i} ".encode())

    iteration = [0]
    init, commit = _archive.ArchiveWriter.__init__, _archive.ArchiveWriter.commit

    def traced_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        mark("W", iteration[0])  # temp file created, members about to be written

    def traced_commit(self):
        mark("C", iteration[0])  # central directory, fsync, rename, folder fsync
        commit(self)
        mark("R", iteration[0])  # the target now holds this iteration

    _archive.ArchiveWriter.__init__, _archive.ArchiveWriter.commit = traced_init, traced_commit
    layer = pz.nn.Linear(
        weights=pz.Parameter(value=pz.nx.wrap(WEIGHTS, "features", "out"), label="w"),
        in_axis_names=("features",),
        out_axis_names=("out",),
    )
    model = pz.nn.Sequential([layer])
    argument = pz.nx.wrap(np.ones((4, WEIGHTS.shape[0]), np.float32), "batch", "features")
    selection = pz.select(model).at_instances_of(pz.nn.Linear)
    mark("ready", 0)
    for i in range(PACKS):
        iteration[0] = i
        mark("P", i)  # capture and encoding
        reprokit.pack(selection, argument, out=target, note=f"{note_prefix}{i}", check=False)
    mark("done", 0)
    os._exit(0)


def start(target, note_prefix):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            child(target, write, note_prefix)
        finally:
            os._exit(1)
    os.close(write)
    os.set_blocking(read, False)
    return pid, read


def drain(fd, buffer):
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return buffer
        if not chunk:
            return buffer
        buffer += chunk.decode()


# Calibration: `parallel` children pack PACKS times unkilled, under the same
# load as the kills; their timings set the windows the kill times are drawn from.
calibration = os.path.join(folder, "calibration")
os.makedirs(calibration)
previous = os.path.join(calibration, "previous0.repro.zip")
started = [start(os.path.join(calibration, f"previous{k}.repro.zip"), "previous")
           for k in range(parallel)]
timelines = [{} for _ in started]
while not all("done0" in times for times in timelines):
    time.sleep(0.001)
    for (pid, fd), times in zip(started, timelines):
        for m in drain(fd, "").split():
            times[m] = time.monotonic()
for pid, fd in started:
    os.waitpid(pid, 0)
    os.close(fd)
window = sorted(t["done0"] - t["ready0"] for t in timelines)[parallel // 2]
write_window = sorted(
    t[f"C{i}"] - t[f"W{i}"] for t in timelines for i in range(PACKS)
)[parallel * PACKS // 2]
commit_window = sorted(
    t[f"R{i}"] - t[f"C{i}"] for t in timelines for i in range(PACKS)
)[parallel * PACKS // 2]
phases = {m: round(t - timelines[0]["ready0"], 3) for m, t in timelines[0].items()}

# Half the kills fall anywhere in the packs (stratified over the window),
# a quarter while a random pack writes its members into the temp file, a
# quarter during its commit (central directory, fsync, rename, folder
# fsync): the moments atomicity is about.
rng = random.Random(seed)
plans = []
for j in range(kills):
    if j % 2 == 0:
        plans.append(("ready0", (j + rng.random()) / kills * window * 1.1))
    elif j % 4 == 1:
        plans.append((f"W{rng.randrange(PACKS)}", rng.random() * write_window * 1.2))
    else:
        plans.append((f"C{rng.randrange(PACKS)}", rng.random() * commit_window * 1.2))
rng.shuffle(plans)
results, running, queue = [], {}, list(enumerate(plans))
while queue or running:
    while queue and len(running) < parallel:
        index, (anchor, delay) = queue.pop()
        work = os.path.join(folder, f"kill{index:03d}")
        os.makedirs(work)
        target = os.path.join(work, "layer.repro.zip")
        had_previous = index % 2 == 0
        if had_previous:
            shutil.copyfile(previous, target)
        pid, fd = start(target, "iteration")
        running[pid] = dict(index=index, anchor=anchor, delay=delay, fd=fd, marks="", deadline=None,
                            work=work, target=target, had_previous=had_previous)
    time.sleep(0.001)
    now = time.monotonic()
    for pid, job in list(running.items()):
        job["marks"] = drain(job["fd"], job["marks"])
        if job["deadline"] is None and job["anchor"] in job["marks"].split():
            job["deadline"] = now + job["delay"]
        if job["deadline"] is not None and now >= job["deadline"]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            job["marks"] = drain(job["fd"], job["marks"])
            os.close(job["fd"])
            del running[pid]
            target = job["target"]
            state, valid, note = "absent", None, None
            if os.path.exists(target):
                try:
                    verify_archive(target)
                    valid = True
                except reprokit.ReprokitError as error:
                    valid = str(error)
                if valid is True:
                    note = json.loads(zipfile.ZipFile(target).read("manifest.json"))["note"]
                state = "present"
            results.append(dict(
                index=job["index"], anchor=job["anchor"], delay=round(job["delay"], 4),
                marks=job["marks"].split(),
                had_previous=job["had_previous"], state=state, valid=valid, note=note,
                files=sorted(os.listdir(job["work"])), work=job["work"],
            ))
print(json.dumps({"window": window, "write_window": write_window,
                  "commit_window": commit_window, "phases": phases,
                  "results": results}))
'''


def _phase(marks: list[str]) -> str:
    """Where a kill landed, from the last phase mark the child wrote."""
    last = [m for m in marks if m[0] in "PWCR"]
    if not last:
        return "before the first pack"
    return {
        "P": "capture/encoding",
        "W": "writing members",
        "C": "commit (fsync, rename)",
        "R": "between packs",
    }[last[-1][0]]


def test_sigkill_at_random_points(tmp_path):
    script = tmp_path / "forker.py"
    script.write_text(_FORKER)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(work), str(KILLS), str(PARALLEL), "20260101"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert len(results) == KILLS
    phases: dict[str, int] = {}
    leftover_temps = 0
    for result in results:
        phase = _phase(result["marks"])
        phases[phase] = phases.get(phase, 0) + 1
        committed = [int(m[1:]) for m in result["marks"] if m[0] == "R"]
        committing = [int(m[1:]) for m in result["marks"] if m[0] == "C"]
        where = json.dumps(result)
        if result["state"] == "absent":
            # Nothing was ever committed, and there was nothing before.
            assert not committed and not result["had_previous"], where
        else:
            assert result["valid"] is True, where
            if result["note"].startswith("previous"):
                assert result["had_previous"] and not committed, where
            else:
                iteration = int(result["note"].removeprefix("iteration"))
                # The last committed pack, or the one whose rename had happened
                # when the kill arrived (between its C and R marks).
                allowed = set(committed[-1:]) | set(committing[-1:])
                assert iteration in allowed, where
        for name in result["files"]:
            if name in OUR_FILES:
                continue
            match = TEMP_NAME.fullmatch(name)
            # The archive's temp file, or the issue snippet's (written the same
            # way after the archive is in place: a kill before its rename
            # leaves it, and the archive is already whole).
            assert match and match["base"] in OUR_FILES, where
            if match["base"] == "layer.issue.md":
                assert "layer.repro.zip" in result["files"] and result["valid"], where
            leftover_temps += 1
    print(
        f"\nSIGKILL at {KILLS} points (3 packs: {report['window']:.2f} s; writing: "
        f"{report['write_window'] * 1000:.0f} ms; commit: {report['commit_window'] * 1000:.0f} ms):"
        " "
        f"{phases}; temp files left by SIGKILL: {leftover_temps}"
    )
    # The kills must really have hit archives being written, not only capture.
    assert phases.get("writing members", 0) >= 5, phases
    assert phases.get("commit (fsync, rename)", 0) >= 3, phases
    # And what survived must load, not only verify.
    survivors = [r for r in results if r["state"] == "present" and r["note"].startswith("it")]
    for result in survivors[:3]:
        loaded = reprokit.load(os.path.join(result["work"], "layer.repro.zip"))
        assert loaded.manifest["note"] == result["note"]


def _tiny_selection():
    import models
    from penzai import pz

    model = models.mlp()
    return pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0), models.mlp_input()


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_an_error_while_writing_leaves_no_temp_file_and_the_previous_archive(
    tmp_path, monkeypatch, error
):
    from reprokit.views import _script

    selection, argument = _tiny_selection()
    target = tmp_path / "layer.repro.zip"
    reprokit.pack(selection, argument, out=target, note="previous", check=False)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise error  # after the arrays are written, before the commit

    monkeypatch.setattr(_script, "render_replay_script", broken)
    with pytest.raises(type(error)):
        reprokit.pack(selection, argument, out=target, note="new", check=False)
    assert set(os.listdir(tmp_path)) <= set(OUR_FILES)
    assert target.read_bytes() == before
    verify_archive(target)


_DISK_FULL = r"""
import os, resource, signal, sys
import models
from penzai import pz
import reprokit
target = sys.argv[1]
model = models.mlp()
selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
# A file-size limit makes the write fail halfway, like a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    reprokit.pack(selection, models.mlp_input(), out=target, note="new", check=False)
except OSError as error:
    print("failed:", error.errno)
else:
    print("packed")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_leaves_no_temp_file_and_the_previous_archive(tmp_path):
    selection, argument = _tiny_selection()
    target = tmp_path / "layer.repro.zip"
    reprokit.pack(selection, argument, out=target, note="previous", check=False)
    before = target.read_bytes()
    assert len(before) > 4096
    done = run_python(_DISK_FULL.replace("sys.argv[1]", repr(str(target))), timeout=120)
    assert "failed: 27" in done.stdout, done.stdout + done.stderr  # EFBIG
    assert set(os.listdir(tmp_path)) <= set(OUR_FILES)
    assert target.read_bytes() == before
