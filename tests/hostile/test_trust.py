"""Trust across processes and readers (SECURITY.md, classes 2-10), each with a hand-built attack.

The corpus (test_corpus.py) covers what one command refuses by itself; the
tests here need a second process, a planted file or a measurement: a
replay.py that differs from what the record renders, a `json.py` planted
where a worker starts, a structure that would need gigabytes, a symlink
where an output goes, a pack killed halfway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_reprokit, subprocess_env
from fuzzer import read_members, replace_member, write_members

HERE = Path(__file__).resolve().parent


def _pack(folder: Path, name: str = "base", **options) -> Path:
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models import simple_mlp

    import reprokit

    model = simple_mlp.MLP.from_config(
        name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 8, 4]
    )
    argument = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
    selection = pz.select(model).at_instances_of(pz.nn.Linear).pick_nth_selected(0)
    path = folder / f"{name}.repro.zip"
    options.setdefault("check", False)
    reprokit.pack(selection, argument, out=path, **options)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _pack(tmp_path_factory.mktemp("trust"))


# ------------------------------------------------------------------ class 2


def test_verify_inspect_and_run_say_whether_replay_py_is_ours(base, tmp_path):
    members = read_members(base)
    script = next(m.data for m in members if m.name == "replay.py")
    edited = tmp_path / "edited.repro.zip"
    # One appended line: valid UTF-8, no control characters, still passes verify.
    write_members(
        replace_member(members, "replay.py", script + b"__import__('os').system('id')\n"), edited
    )

    ours = run_reprokit("verify", base, "--json")
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout)["replay_script"] == "identical"
    theirs = run_reprokit("verify", edited)
    assert theirs.returncode == 0, theirs.stderr
    assert "replay.py in this archive differs from what reprokit" in theirs.stdout
    inspected = run_reprokit("inspect", edited, "--json")
    assert json.loads(inspected.stdout)["replay_script"] == "differs"
    ran = run_reprokit("run", edited)
    assert ran.returncode == 0, ran.stderr
    assert "warning: replay.py in this archive differs" in ran.stderr
    assert "differs" not in run_reprokit("run", base).stderr


# ------------------------------------------------------------------ class 3

_PLANTED = (
    "import os\n"
    "open(os.path.join(os.getcwd(), 'PLANTED-MODULE-RAN'), 'w').write(__file__)\n"
    "raise ImportError('planted json.py')\n"
)


def test_sweep_workers_never_import_a_file_planted_in_the_current_folder(base, tmp_path):
    """`reprokit run --sweep` from a folder holding a planted json.py: no worker imports it."""
    folder = tmp_path / "extracted"
    folder.mkdir()
    (folder / "json.py").write_text(_PLANTED)
    (folder / "numpy.py").write_text(_PLANTED)
    command = Path(sys.executable).with_name("reprokit")
    env = subprocess_env()
    env["PYTHONSAFEPATH"] = ""  # not relied on: -I must do it
    done = subprocess.run(
        [str(command), "run", str(base), "--sweep", "--json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert not (folder / "PLANTED-MODULE-RAN").exists(), done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)["sweep"]
    workers = [row for row in rows if row["condition"].startswith("x64")]
    assert workers and all(row["ran"] for row in workers), rows


def test_every_child_interpreter_is_started_isolated():
    """No module of reprokit starts `sys.executable` except through the isolated command."""
    offenders = []
    for path in (HERE.parents[1] / "reprokit").rglob("*.py"):
        if path.name == "_workers.py":
            continue
        text = path.read_text()
        if "sys.executable" in text and "python_command" not in text:
            offenders.append(str(path))
    assert offenders == [] or all("bisecting" in o for o in offenders), offenders


# ------------------------------------------------------------------ class 6

# Peak memory a `verify` of a hostile structure may add to a plain verify's.
_PARSE_BOUND_MIB = 400


def _msgpack_flood(item: bytes, total: int) -> bytes:
    """A structure whose argument holds `total` bytes of `item` repeated (arrays of <= 4M items)."""
    chunks, count = [], total // len(item)
    while count > 0:
        size = min(4_000_000, count)
        chunks.append(b"\xdd" + size.to_bytes(4, "big") + item * size)
        count -= size
    head = b"\x82\xa6record\x81\xa8argument\xdd" + len(chunks).to_bytes(4, "big")
    return head + b"".join(chunks) + b"\xa6arrays\x90"


def _peak_rss_mib(args: list[str]) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in MiB) of `python -m reprokit ARGS` in a fresh process."""
    code = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-m', 'reprokit', *sys.argv[1:]],"
        " capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024\n"
        "print(done.returncode, peak)\n"
        "sys.stderr.write(done.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    exit_code, peak = map(int, done.stdout.split())
    return exit_code, done.stderr, peak


@pytest.mark.parametrize(
    "label, item, total",
    [
        # 60 MB of empty lists once needed 4.5 GiB; now the member is too big.
        ("empty-lists-60MB", b"\x90", 60 * 2**20),
        # Just under the structure cap: the container count stops the parse.
        ("empty-lists-7MB", b"\x90", 7 * 2**20),
        ("empty-maps-7MB", b"\x80", 7 * 2**20),
        # Strings are not containers: bounded by the cap alone (~25 bytes each per byte).
        ("short-strings-7MB", b"\xa2ab", 7 * 2**20),
    ],
)
def test_a_structure_flood_is_refused_in_bounded_memory(base, tmp_path, label, item, total):
    members = read_members(base)
    hostile = tmp_path / f"{label}.repro.zip"
    write_members(
        replace_member(members, "structure.msgpack", _msgpack_flood(item, total)), hostile
    )
    _, _, baseline = _peak_rss_mib(["verify", str(base)])
    code, stderr, peak = _peak_rss_mib(["verify", str(hostile)])
    assert code == 3, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert peak - baseline < _PARSE_BOUND_MIB, (label, peak, baseline, stderr)


# ------------------------------------------------------------------ class 10


def test_verify_and_inspect_stream_a_large_deflated_array_that_run_accepts(tmp_path):
    """An 80 MB compressible array packed with compress=True: verify, inspect and run all accept it."""
    import jax.numpy as jnp
    from penzai import pz

    import reprokit

    layer = pz.nn.Linear.from_config(
        name="big",
        init_base_rng=__import__("jax").random.key(0),
        input_axes={"f": 4},
        output_axes={"o": 2},
    )
    rows = 5 * 2**20  # x 4 float32 = 80 MiB, deflates ~3x: stored deflated, above 64 MiB
    argument = pz.nx.wrap(jnp.arange(rows * 4, dtype=jnp.float32).reshape(rows, 4) % 977, "b", "f")
    path = tmp_path / "big.repro.zip"
    reprokit.pack(
        pz.select(layer).at_keypaths([()]), argument, out=path, compress=True, check=False
    )
    from reprokit.archive._container import ArchiveReader

    with ArchiveReader(path) as reader:
        deflated = [
            name
            for name in reader.names
            if name.startswith("arrays/")
            and reader.size(name) > 64 * 2**20
            and reader._member(name).method == 8
        ]
    assert deflated, "the test needs a deflated array over the in-memory limit"
    for command in ("verify", "inspect"):
        done = run_reprokit(command, path)
        assert done.returncode == 0, (command, done.stderr)
    ran = run_reprokit("run", path)
    assert ran.returncode == 0, ran.stderr


# ------------------------------------------------------------------ class 8


def test_html_view_and_issue_snippet_never_follow_a_planted_symlink(base, tmp_path):
    """Symlinks planted where the outputs' temp files used to go (name.PID.tmp) stay untouched."""
    import os

    from reprokit.archive._open import open_archive
    from reprokit.views._inspect import write_html
    from reprokit.views._issue import issue_path_for, write_issue_snippet

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "view.html"
    (tmp_path / f"view.html.{os.getpid()}.tmp").symlink_to(victim)
    archive = tmp_path / "copy.repro.zip"
    archive.write_bytes(base.read_bytes())
    snippet = Path(issue_path_for(archive))
    Path(f"{snippet}.{os.getpid()}.tmp").symlink_to(victim)
    write_html(archive, out)
    opened = open_archive(archive)
    try:
        write_issue_snippet(archive, manifest=opened.manifest, structure=opened.structure)
    finally:
        opened.close()
    assert victim.read_text() == "precious\n"
    assert out.is_file() and not out.is_symlink() and "<html" in out.read_text().lower()
    assert snippet.is_file() and not snippet.is_symlink()
    # A link planted at the output itself is replaced, never written through.
    out.unlink()
    out.symlink_to(victim)
    write_html(archive, out)
    assert victim.read_text() == "precious\n" and not out.is_symlink()


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_pack_killed_during_the_self_check_leaves_no_accepted_file_and_no_orphan(tmp_path):
    import signal
    import time

    from reprokit._errors import ReprokitError
    from reprokit.archive._verify import verify_archive

    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from pathlib import Path\n"
        "from test_trust import _pack\n"
        "_pack(Path(sys.argv[1]), check=True)\n"
    )
    folder = tmp_path / "out"
    folder.mkdir()
    packer = subprocess.Popen(
        [sys.executable, "-c", script, str(folder)],
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    worker = None
    deadline = time.monotonic() + 240
    while worker is None and time.monotonic() < deadline and packer.poll() is None:
        worker = next(
            (pid for pid, cmd in _children(packer.pid) if "reprokit.capture._selfcheck" in cmd),
            None,
        )
        time.sleep(0.05)
    assert worker is not None, "the self-check never started: " + packer.stderr.read().decode()
    time.sleep(1.0)  # well inside the self-check's replay
    packer.send_signal(signal.SIGKILL)
    packer.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the self-check worker outlived the killed pack"
    for leftover in folder.iterdir():
        with pytest.raises(ReprokitError):
            verify_archive(leftover)


# ------------------------------------------------------------------ class 7


def _edited(base: Path, folder: Path, manifest_edit=None, structure_edit=None) -> Path:
    import msgpack

    members = read_members(base)
    if manifest_edit is not None:
        manifest = json.loads(next(m.data for m in members if m.name == "manifest.json"))
        manifest_edit(manifest)
        members = replace_member(members, "manifest.json", json.dumps(manifest).encode())
    if structure_edit is not None:
        data = next(m.data for m in members if m.name == "structure.msgpack")
        structure = msgpack.unpackb(data, raw=False)
        structure_edit(structure)
        members = replace_member(members, "structure.msgpack", msgpack.packb(structure))
    path = folder / "edited.repro.zip"
    write_members(members, path)
    return path


def test_issue_fences_the_note_beyond_any_backtick_run(base, tmp_path):
    note = "see below\n````\n# Not a heading\n```\n<img src=x onerror=alert(1)>\n`````"
    path = _edited(base, tmp_path, lambda m: m.__setitem__("note", note))
    done = run_reprokit("issue", path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    fence = "`" * 6
    assert f"{fence}text\n{note}\n{fence}\n" in text
    # Nothing after the note is swallowed by it: the replay section still starts a heading.
    assert "\n### Replay" in text.split(note, 1)[1]


def test_archive_strings_reach_the_terminal_escaped(base, tmp_path):
    """A dict key with terminal escapes and a bidi override, printed by inspect, escaped."""

    def add_key(structure):
        structure["record"]["side_inputs"]["v"].append(["\x1b]0;pwned\x07\u202eevil", 1.0])

    path = _edited(base, tmp_path, structure_edit=add_key)
    for command in ("inspect", "run", "verify"):
        done = run_reprokit(command, path)
        printed = done.stdout + done.stderr
        assert "\x1b" not in printed and "\u202e" not in printed and "\x07" not in printed, (
            command,
            printed[-500:],
        )
    assert "\\x1b]0;pwned\\x07\\u202eevil" in run_reprokit("inspect", path).stdout


# ------------------------------------------------------------------ class 4


def test_xla_flags_are_read_as_xla_reads_them():
    from reprokit.archive._format import xla_tokens

    assert xla_tokens('--xla_dump_hlo_as_text="true"--xla_dump_to=dumps') == [
        "--xla_dump_hlo_as_text=true",
        "--xla_dump_to=dumps",
    ]
    assert xla_tokens('--a=\'x y\'\t--b="q\\"z" --c') == ["--a=x y", '--b=q"z', "--c"]


def test_only_numerics_flags_are_applied_and_all_are_probed_in_one_child(monkeypatch):
    from reprokit.environment import _config
    from reprokit.environment._config import check_xla_flags, replayable_xla_flags

    children = []
    probe = _config._probe
    monkeypatch.setattr(
        _config, "_probe", lambda flags, timeout: children.append(1) or probe(flags, timeout)
    )

    keep, left_out = replayable_xla_flags(
        ["--xla_cpu_enable_fast_math=false", "--xla_dump_hlo_as_text=true", "--xla_gpu_ptx_file=x"]
    )
    assert keep == ["--xla_cpu_enable_fast_math=false"]
    assert left_out == ["--xla_dump_hlo_as_text=true", "--xla_gpu_ptx_file=x"]
    # 250 flags XLA does not know: one child names them all, one confirms the rest.
    unknown = [f"--xla_reprokit_no_such_flag_{i}=1" for i in range(250)]
    accepted, rejected = check_xla_flags(["--xla_cpu_enable_fast_math=false", *unknown])
    assert accepted == ["--xla_cpu_enable_fast_math=false"] and rejected == unknown
    assert len(children) == 2  # not 251 (250 children took 73 s)


# ------------------------------------------------------------------ class 5

_FAKE_USER = "zelda-reprokit-reporter"

_REPORTER_SCRIPT = '''
import dataclasses, sys
import jax, jax.numpy as jnp
from penzai import pz
from penzai.models import simple_mlp
import reprokit


@pz.pytree_dataclass
class Scaled(pz.nn.Layer):
    scale: float = dataclasses.field(metadata={"pytree_node": False}, default=2.0)
    raise_it: bool = dataclasses.field(metadata={"pytree_node": False}, default=False)

    def __call__(self, x, **side_inputs):
        if self.raise_it:
            raise ValueError(f"failed in {__file__} for " + sys.argv[1])
        return x * self.scale


mlp = simple_mlp.MLP.from_config(name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 4])
x = pz.nx.wrap(jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "batch", "features")
model = pz.nn.Sequential([Scaled(), mlp])
pick = pz.select(model).at_instances_of(Scaled).pick_nth_selected(0)
reprokit.pack(pick, x, out="eager.repro.zip", bundle_code=True, allow_modules=["__main__"])
reprokit.pack(pick, x, out="jit.repro.zip", mode="jit", check=False, bundle_code=True,
              allow_modules=["__main__"])
failing = pz.select(pz.nn.Sequential([Scaled(raise_it=True), mlp])).at_instances_of(Scaled)
reprokit.pack(failing.pick_nth_selected(0), x, out="raises.repro.zip", bundle_code=True,
              allow_modules=["__main__"])
'''


def test_nothing_from_the_reporters_disk_in_any_member(tmp_path):
    """Pack from a project under a fake home whose path holds a fake user name; grep every member."""
    import zipfile

    home = tmp_path / "home" / _FAKE_USER
    project = home / "projects" / "secret-project"
    project.mkdir(parents=True)
    (project / "train_model.py").write_text(_REPORTER_SCRIPT)
    env = subprocess_env(HOME=str(home), USER=_FAKE_USER, LOGNAME=_FAKE_USER)
    done = subprocess.run(
        [sys.executable, "train_model.py", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    archives = sorted(project.glob("*.repro.zip"))
    assert [a.name for a in archives] == ["eager.repro.zip", "jit.repro.zip", "raises.repro.zip"]
    leaks = []
    for archive in archives:
        with zipfile.ZipFile(archive) as opened:
            names = opened.namelist()
            assert "stablehlo.mlirbc" in names or archive.name == "raises.repro.zip", names
            for name in names:
                data = opened.read(name)
                for secret in (_FAKE_USER, str(home), str(tmp_path)):
                    if secret.encode() in data:
                        leaks.append(f"{archive.name}:{name} holds {secret!r}")
    assert leaks == []
