"""reprokit's storage benchmark: pack and replay against the physical limit and the alternatives.

Why this exists: reprokit promises to cost barely more than writing and
reading the bytes (issue 6). That claim is a set of ratios, and a ratio
only means something when both sides are measured in the same run, on the
same machine, on the same bytes. This harness measures, with repeats and
medians:

* `reprokit.pack(..., check=False)` vs a raw write+fsync of the same array
  bytes (plus: a raw write that starts writeback early, the tighter limit;
  pack's write path and archive stream alone; the pack's other phases; the
  first pack; and the self-check that `pack` runs by default);
* `reprokit.load` (what `reprokit run` does before calling the layer) vs a
  raw cold read of the same bytes into aligned buffers;
* peak extra RSS of each against the array bytes;
* `np.savez`/`np.load`, orbax-checkpoint's StandardCheckpointer and `pickle`
  of the captured record, the alternatives a user would otherwise reach for;
* `reprokit run` on a small archive vs `python -c "import jax, penzai"`, and
  `reprokit verify` / `inspect`;
* pack's size fitting (`--max-size 25MB`: deflate where it pays) on
  NaN-filled and zero-heavy weights;
* how pack and load grow with the number of leaves (10 -> 10,000);
* issue 17's targets, each a ratio of methods timed interleaved in one
  worker: a small layer's pack(check=False) vs one eager forward + one jit
  lowering; the self-check vs one `reprokit run`; `run` vs the backend-start
  floor; pack/load of 10,000 leaves (plain and NamedArrays in a dict) vs
  np.savez/np.load, and at 20,000 (linear growth); a 1,000-layer pack vs
  forward + np.savez; find(check="mismatch") vs one forward; `inspect` of
  100,000 arrays (seconds, and memory at 50,000 vs 100,000).

It prints Markdown tables of ratios and writes everything to
`benchmarks/results.json`. Each measurement runs in a worker process
(`benchmarks.worker`); see `benchmarks._measure` for how reads are made
cold, RAM is warmed and peak RSS is taken.

    python -m benchmarks            # default: 16 MiB, 256 MiB, 1 GiB (< 5 min on 2 cores)
    python benchmarks/run.py --quick
    python -m benchmarks --only-round2 [--round2 fixed,perleaf,find,inspect]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import cold_method, machine_load, median  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results.json"
MIB = 2**20
DEFAULT_SIZES = (16, 256, 1024)
DEFAULT_LEAF_COUNTS = (10, 100, 1000, 10000)
DEFAULT_LAYER_COUNTS = (10, 100, 1000)

TARGETS = {
    "pack": 1.15,  # x raw write+fsync
    "load": 1.25,  # x raw cold read, integrity checks on
    "peak": 1.10,  # x array bytes, extra RSS of pack and of load
    "run": 1.30,  # x `python -c "import jax, penzai"`
}

WRITE_COLUMNS = (
    ("raw", "raw write+fsync"),
    ("raw_early", "raw, early writeback"),
    ("pack", "reprokit.pack"),
    ("write_path", "pack write path"),
    ("stream", "archive stream"),
    ("npz", "np.savez"),
    ("orbax", "orbax save"),
    ("pickle", "pickle.dump"),
)
READ_COLUMNS = (
    ("raw", "raw cold read"),
    ("load", "reprokit.load"),
    ("npz", "np.load"),
    ("orbax", "orbax restore"),
    ("pickle", "pickle.load"),
)


# ------------------------------------------------------------ running workers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A fixed threshold turns off glibc's adaptive one, which after the first
    # free of a large block serves blocks up to 32 MiB from a heap it never
    # returns: RSS would then hide allocations (peak 0× for a load) and warm
    # pages would stay private to one process.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    return env


def run_worker(task: str, args: dict, log: Any, verbose: bool) -> dict:
    """Runs `benchmarks.worker TASK` in a fresh process and returns its result."""
    command = [sys.executable, "-m", "benchmarks.worker", task, json.dumps(args)]
    done = subprocess.run(
        command,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=None if verbose else log,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    if not verbose:
        log.flush()
        with open(log.name) as text:
            print("".join(text.readlines()[-20:]), file=sys.stderr)
    raise RuntimeError(f"benchmark task {task!r} failed (exit {done.returncode})")


def _reprokit_command() -> list[str]:
    script = Path(sys.executable).with_name("reprokit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "reprokit"]


_IMPORTS_PROBE = """
import json, sys
sys.argv = ["reprokit", *json.loads(sys.argv[1])]
from reprokit._cli import main
try:
    main()
except SystemExit:
    pass
heavy = ("jax", "penzai", "orbax", "jinja2", "treescope", "tensorstore")
print("IMPORTS " + json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def process_times(archive: str, repeats: int) -> dict:
    """Wall time of whole processes: `reprokit run/verify/inspect` vs the import floors."""
    reprokit = _reprokit_command()
    commands = {
        "floor": [sys.executable, "-c", "import jax, penzai"],
        "floor_op": [
            sys.executable,
            "-c",
            "import jax, penzai; from penzai import pz; "
            "jax.jit(lambda x: x + 1)(jax.numpy.ones(3)).block_until_ready()",
        ],
        # Issue 17's backend-start floor: the imports plus one array on the device.
        "floor_zeros": [
            sys.executable,
            "-c",
            "import jax, penzai; jax.numpy.zeros(1).block_until_ready()",
        ],
        "run": [*reprokit, "run", archive],
        "verify": [*reprokit, "verify", archive],
        "inspect": [*reprokit, "inspect", archive],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    env = _env()
    for rep in range(repeats + 1):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(
                command,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            if rep:  # the first round only warms the page cache
                times[name].append(time.perf_counter() - start)
    imports = {}
    for verb in ("run", "verify", "inspect"):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORTS_PROBE, json.dumps([verb, archive])],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("IMPORTS ")), None)
        imports[verb] = json.loads(line[len("IMPORTS ") :]) if line else None
    return {"times": times, "imports": imports}


# ------------------------------------------------------------ machine facts


def machine_info(folder: str) -> dict:
    """What the numbers came from: CPU, cores, RAM, kernel, filesystem, versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as file:
            info["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in file if line.startswith("model name")),
                None,
            )
        with open("/proc/meminfo") as file:
            info["ram_gib"] = round(int(file.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        done = subprocess.run(
            ["df", "-T", folder], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        fields = done.stdout.splitlines()[-1].split()
        info["filesystem"] = f"{fields[1]} on {fields[0]}"
    except (OSError, IndexError):
        pass
    from importlib import metadata

    for package in ("jax", "jaxlib", "penzai", "orbax-checkpoint", "numpy", "reprokit"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


# ------------------------------------------------------------ summaries


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _summarize_size(write: dict, read: dict) -> dict:
    nbytes = write["array_bytes"]
    w = {k: median(v) for k, v in write["times"].items()}
    r = {k: median(v) for k, v in read["times"].items()}
    w_best = {k: min(v) for k, v in write["times"].items()}
    r_best = {k: min(v) for k, v in read["times"].items()}
    wp = {k: median(v) / nbytes for k, v in write["peaks"].items()}
    rp = {k: median(v) / nbytes for k, v in read["peaks"].items()}
    phases = {k: median(v) for k, v in write["breakdown"].items()}
    phases["write_path"] = w["write_path"]
    phases["stream"] = w["stream"]
    phases["rest"] = w["pack"] - sum(
        phases[k] for k in ("capture", "stablehlo", "write_path", "issue_snippet")
    )
    return {
        "name": write["name"],
        "array_bytes": nbytes,
        "array_count": write["array_count"],
        "write_s": w,
        "read_s": r,
        "write_ratio": {k: _ratio(v, w["raw"]) for k, v in w.items()},
        "read_ratio": {k: _ratio(v, r["raw"]) for k, v in r.items()},
        # Best of the repeats over best: other work on the machine only adds time.
        "write_ratio_best": {k: _ratio(v, w_best["raw"]) for k, v in w_best.items()},
        "read_ratio_best": {k: _ratio(v, r_best["raw"]) for k, v in r_best.items()},
        "write_peak_ratio": wp,
        "read_peak_ratio": rp,
        "pack_phases_s": phases,
        "first_pack_s": write["first_pack_s"],
        "self_check_s": (write["self_check"] or {}).get("seconds"),
        "file_bytes": write["file_bytes"],
        "raw": {
            "write": write["times"],
            "read": read["times"],
            "write_peaks": write["peaks"],
            "read_peaks": read["peaks"],
        },
    }


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def _fmt_x(ratio: float | None) -> str:
    if ratio is None or ratio != ratio:
        return "-"
    return f"{ratio:.2f}×" if ratio < 100 else f"{ratio:.0f}×"


def _size_label(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def targets(sizes: list[dict], process: dict | None) -> list[dict]:
    """Each target of issue 6, measured in this run: value, limit, met."""
    out = []
    for size in sizes:
        label = _size_label(size["array_bytes"])
        for key, what in (
            ("write_path", "pack write path / raw write+fsync"),
            ("pack", "whole pack(check=False) / raw write+fsync"),
        ):
            out.append(
                {
                    "target": f"{what} ({label})",
                    "value": size["write_ratio"][key],
                    "best": size["write_ratio_best"][key],
                    "limit": TARGETS["pack"],
                }
            )
        out.append(
            {
                "target": f"load / raw cold read ({label})",
                "value": size["read_ratio"]["load"],
                "best": size["read_ratio_best"]["load"],
                "limit": TARGETS["load"],
            }
        )
        out.append(
            {
                "target": f"pack peak extra RSS / array bytes ({label})",
                "value": size["write_peak_ratio"]["pack"],
                "limit": TARGETS["peak"],
            }
        )
        out.append(
            {
                "target": f"load peak extra RSS / array bytes ({label})",
                "value": size["read_peak_ratio"]["load"],
                "limit": TARGETS["peak"],
            }
        )
    if process:
        t = {k: median(v) for k, v in process["times"].items()}
        b = {k: min(v) for k, v in process["times"].items()}
        out.append(
            {
                "target": "`reprokit run` (small archive) / `import jax, penzai`",
                "value": _ratio(t["run"], t["floor"]),
                "best": _ratio(b["run"], b["floor"]),
                "limit": TARGETS["run"],
            }
        )
        for verb in ("verify", "inspect"):
            out.append(
                {
                    "target": f"`reprokit {verb}` / `reprokit run`",
                    "value": _ratio(t[verb], t["run"]),
                    "limit": 1.0,
                }
            )
    for row in out:
        row["met"] = bool(row["value"] <= row["limit"])
    return out


ROUND2_LIMITS = {
    "fixed": 1.5,  # x (one eager forward + one jit lowering)
    "self_check": 1.2,  # x one `reprokit run` of the same archive
    "run_floor": 1.2,  # x `import jax, penzai; jnp.zeros(1)`
    "leaves_pack": 2.0,  # x np.savez
    "leaves_load": 2.0,  # x np.load
    "doubling": 2.2,  # pack(2N) / pack(N): linear is 2.0
    "layers": 2.0,  # x (one forward + np.savez)
    "find": 4.0,  # x one plain forward
    "inspect_s": 2.0,  # seconds, 100,000 arrays
    "inspect_memory": 2.2,  # (peak RSS - base) at 2N / at N: linear is 2.0
}


def _best_ratio(times: dict, top: str, bottom: list[str]) -> float:
    return _ratio(min(times[top]), sum(min(times[k]) for k in bottom))


def _export_note(medians: dict, baseline: float) -> str:
    """What pack's StableHLO export (timed alone, interleaved) took, and pack's ratio without it."""
    export = medians.get("export")
    if export is None:
        return ""
    return (
        f"of which StableHLO export {_fmt_s(export)}; without it "
        f"{_ratio(medians['pack'] - export, baseline):.2f}×"
    )


def round2_targets(results: dict) -> list[dict]:
    """Issue 17's targets, each a ratio measured in this run (median; best of repeats beside)."""
    out = []

    def add(target: str, value: float, limit: float, best: float | None = None, note: str = ""):
        row = {"target": target, "value": value, "limit": limit, "met": bool(value <= limit)}
        if best is not None:
            row["best"] = best
        if note:
            row["note"] = note
        out.append(row)

    fixed = results.get("fixed")
    if fixed:
        t = {k: median(v) for k, v in fixed["times"].items()}
        add(
            "1. small layer: pack(check=False) / (eager forward + jit lower)",
            _ratio(t["pack"], t["forward"] + t["lower"]),
            ROUND2_LIMITS["fixed"],
            _best_ratio(fixed["times"], "pack", ["forward", "lower"]),
            note=(
                f"jax.export alone {_ratio(t['export'], t['lower']):.2f}× lower(); "
                f"pack / (forward + jax.export) {_ratio(t['pack'], t['forward'] + t['export']):.2f}×"
                if "export" in t
                else ""
            ),
        )
        if fixed.get("self_check"):
            c = {k: median(v) for k, v in fixed["self_check"].items()}
            add(
                "2. self-check / one `reprokit run` (same small archive)",
                _ratio(c["self_check"], c["run"]),
                ROUND2_LIMITS["self_check"],
                _best_ratio(fixed["self_check"], "self_check", ["run"]),
            )
    process = results.get("process")
    if process and "floor_zeros" in process["times"]:
        t = {k: median(v) for k, v in process["times"].items()}
        add(
            "2. `reprokit run` (small archive) / `import jax, penzai; jnp.zeros(1)`",
            _ratio(t["run"], t["floor_zeros"]),
            ROUND2_LIMITS["run_floor"],
            _best_ratio(process["times"], "run", ["floor_zeros"]),
        )
    perleaf = results.get("perleaf")
    if perleaf:
        for name, label in (("plain", "arrays in a tuple"), ("named", "NamedArrays in a dict")):
            row = perleaf.get(name)
            if not row:
                continue
            t = {k: median(v) for k, v in row["times"].items()}
            n = row["leaves"]
            add(
                f"3. pack of {n:,} {label} / np.savez",
                _ratio(t["pack"], t["npz"]),
                ROUND2_LIMITS["leaves_pack"],
                _best_ratio(row["times"], "pack", ["npz"]),
                note=_export_note(t, t["npz"]),
            )
            add(
                f"3. load of {n:,} {label} / np.load",
                _ratio(t["load"], t["npz_load"]),
                ROUND2_LIMITS["leaves_load"],
                _best_ratio(row["times"], "load", ["npz_load"]),
            )
        if perleaf.get("plain") and perleaf.get("plain_double"):
            one, two = perleaf["plain"], perleaf["plain_double"]
            add(
                f"3. pack of {two['leaves']:,} / pack of {one['leaves']:,} leaves (linear: 2.0)",
                _ratio(median(two["times"]["pack"]), median(one["times"]["pack"])),
                ROUND2_LIMITS["doubling"],
                _ratio(min(two["times"]["pack"]), min(one["times"]["pack"])),
            )
        layers = perleaf.get("layers")
        if layers:
            t = {k: median(v) for k, v in layers["times"].items()}
            add(
                f"3. pack of a {layers['layers']:,}-layer Sequential / (forward + np.savez)",
                _ratio(t["pack"], t["forward"] + t["npz"]),
                ROUND2_LIMITS["layers"],
                _best_ratio(layers["times"], "pack", ["forward", "npz"]),
                note=_export_note(t, t["forward"] + t["npz"]),
            )
    find = results.get("find")
    if find:
        add(
            '4. find(check="mismatch") / one plain forward',
            _ratio(median(find["times"]["find"]), median(find["times"]["forward"])),
            ROUND2_LIMITS["find"],
            _best_ratio(find["times"], "find", ["forward"]),
        )
    inspect = results.get("inspect")
    if inspect and inspect["rows"]:
        rows = sorted(inspect["rows"], key=lambda r: r["arrays"])
        big = rows[-1]
        add(
            f"5. `reprokit inspect` of {big['arrays']:,} arrays (seconds)",
            median(big["times"]),
            ROUND2_LIMITS["inspect_s"],
            min(big["times"]),
        )
        if len(rows) > 1:
            base = median(inspect["base_rss"])
            small = rows[0]
            growth = _ratio(median(big["peak_rss"]) - base, median(small["peak_rss"]) - base)
            scale = big["arrays"] / small["arrays"]
            add(
                f"5. inspect peak RSS above the CLI's own, {big['arrays']:,} / "
                f"{small['arrays']:,} arrays (linear: {scale:.1f})",
                growth,
                ROUND2_LIMITS["inspect_memory"] * scale / 2,
            )
    return out


def render(results: dict) -> str:
    """The Markdown tables printed at the end of a run (and pasted into the README)."""
    parts = []
    sizes = results["sizes"]
    if sizes:
        rows = []
        for s in sizes:
            row = [_size_label(s["array_bytes"]), str(s["array_count"])]
            for key, _ in WRITE_COLUMNS:
                if key in s["write_s"]:
                    value = _fmt_s(s["write_s"][key])
                    row.append(
                        value if key == "raw" else f"{value} ({_fmt_x(s['write_ratio'][key])})"
                    )
                else:
                    row.append("-")
            rows.append(row)
        parts.append(
            "**Write** (median; in parentheses: ratio to raw write+fsync of the same bytes)\n\n"
            + _table(["arrays", "leaves", *(h for _, h in WRITE_COLUMNS)], rows)
        )
        rows = []
        for s in sizes:
            row = [_size_label(s["array_bytes"])]
            for key, _ in READ_COLUMNS:
                if key in s["read_s"]:
                    value = _fmt_s(s["read_s"][key])
                    row.append(
                        value if key == "raw" else f"{value} ({_fmt_x(s['read_ratio'][key])})"
                    )
                else:
                    row.append("-")
            rows.append(row)
        parts.append(
            f"**Cold read** (page cache dropped with {results['cold_read_method']}; "
            "ratio to raw read of the same bytes)\n\n"
            + _table(["arrays", *(h for _, h in READ_COLUMNS)], rows)
        )
        rows = []
        for s in sizes:
            wp, rp = s["write_peak_ratio"], s["read_peak_ratio"]
            rows.append(
                [
                    _size_label(s["array_bytes"]),
                    *(_fmt_x(wp.get(k)) for k in ("pack", "npz", "orbax", "pickle")),
                    *(_fmt_x(rp.get(k)) for k in ("raw", "load", "npz", "orbax", "pickle")),
                ]
            )
        parts.append(
            "**Peak extra RSS / array bytes** (median)\n\n"
            + _table(
                [
                    "arrays",
                    "pack",
                    "np.savez",
                    "orbax save",
                    "pickle.dump",
                    "raw read",
                    "reprokit.load",
                    "np.load",
                    "orbax restore",
                    "pickle.load",
                ],
                rows,
            )
        )
        rows = []
        for s in sizes:
            p = s["pack_phases_s"]
            rows.append(
                [
                    _size_label(s["array_bytes"]),
                    _fmt_s(s["write_s"]["pack"]),
                    *(
                        _fmt_s(p.get(k))
                        for k in (
                            "capture",
                            "stablehlo",
                            "write_path",
                            "stream",
                            "issue_snippet",
                            "rest",
                        )
                    ),
                    _fmt_s(s["first_pack_s"]),
                    _fmt_s(s["self_check_s"]),
                ]
            )
        parts.append(
            "**Where `pack(check=False)` spends its time** (medians, each timed on its own; "
            "write path = `write_archive` given the StableHLO module: encode, manifest, "
            "archive stream, fsync, rename; issue snippet = NAME.issue.md with the "
            "archive's sha256; self-check = what the default `check=True` adds)\n\n"
            + _table(
                [
                    "arrays",
                    "pack",
                    "capture (model run)",
                    "StableHLO export",
                    "write path",
                    "of which archive stream",
                    "issue snippet",
                    "unaccounted",
                    "first pack",
                    "self-check",
                ],
                rows,
            )
        )
    process = results.get("process")
    if process:
        t = {k: median(v) for k, v in process["times"].items()}
        labels = {
            "floor": '`python -c "import jax, penzai"`',
            "floor_op": "same + `from penzai import pz` + one jitted op",
            "floor_zeros": "same + `jax.numpy.zeros(1).block_until_ready()`",
            "run": "`reprokit run` small archive",
            "verify": "`reprokit verify` small archive",
            "inspect": "`reprokit inspect` small archive",
        }
        rows = [[labels[k], _fmt_s(v), _fmt_x(_ratio(v, t["floor"]))] for k, v in t.items()]
        imports = process.get("imports") or {}
        parts.append(
            "**Whole processes** (median wall time; ratio to the import floor; "
            "heavy modules imported: "
            + "; ".join(
                f"{verb}: {', '.join(mods) if mods else 'none'}"
                for verb, mods in imports.items()
                if mods is not None
            )
            + ")\n\n"
            + _table(["command", "time", "ratio"], rows)
        )
    leaves = results.get("leaves")
    if leaves:
        rows = []
        for row in leaves["rows"]:
            n = row["leaves"]
            w = {k: median(v) for k, v in row["write"].items()}
            r = {k: median(v) for k, v in row["read"].items()}
            rows.append(
                [
                    str(n),
                    _fmt_s(w["raw"]),
                    _fmt_s(w["pack"]),
                    _fmt_s(w.get("npz")),
                    _fmt_s(w.get("orbax")),
                    _fmt_s(r["raw"]),
                    _fmt_s(r["load"]),
                    _fmt_s(r.get("npz")),
                    _fmt_s(r.get("orbax")),
                    f"{(w['pack'] - w['raw']) / n * 1e6:.0f} µs",
                    f"{(r['load'] - r['raw']) / n * 1e6:.0f} µs",
                ]
            )
        parts.append(
            "**Leaf-count scaling** (1 KiB float32 leaves, input of an Identity layer; "
            "reads with a hot page cache; per-leaf = (method − raw) / leaves)\n\n"
            + _table(
                [
                    "leaves",
                    "raw write",
                    "pack",
                    "np.savez",
                    "orbax save",
                    "raw read",
                    "load",
                    "np.load",
                    "orbax restore",
                    "pack/leaf",
                    "load/leaf",
                ],
                rows,
            )
        )
        if leaves.get("layered"):
            rows = [
                [
                    str(x["layers"]),
                    _fmt_s(x["pack_s"]),
                    _fmt_s(x["capture_s"]),
                    _fmt_s(x["load_s"]),
                    f"{x['pack_s'] / x['layers'] * 1e3:.2f} ms",
                    f"{x['load_s'] / x['layers'] * 1e3:.2f} ms",
                ]
                for x in leaves["layered"]
            ]
            parts.append(
                "**Layer-count scaling** (a `Sequential` of N `AddBias` layers, one leaf "
                "each; pack includes running the model once)\n\n"
                + _table(
                    ["layers", "pack", "of which capture", "load", "pack/layer", "load/layer"], rows
                )
            )
    compress = results.get("compress")
    if compress:
        rows = []
        for x in compress["rows"]:
            if "fitted_error" in x:
                fitted = f"failed: {x['fitted_error']}"
                fitted_s = "-"
            else:
                fitted = (
                    f"{x['fitted_bytes'] / 1e6:.2f} MB ({x['fitted_bytes'] / x['plain_bytes']:.4f})"
                )
                fitted_s = (
                    f"{_fmt_s(x['fitted_s'])} ({_fmt_x(_ratio(x['fitted_s'], x['plain_s']))})"
                )
            rows.append(
                [
                    x["pattern"],
                    _size_label(x["array_bytes"]),
                    f"{x['plain_bytes'] / 1e6:.1f} MB",
                    _fmt_s(x["plain_s"]),
                    fitted,
                    fitted_s,
                    f"{x['deflated_bytes'] / 1e6:.2f} MB "
                    f"({x['deflated_bytes'] / x['plain_bytes']:.4f})",
                    f"{_fmt_s(x['deflated_s'])} ({_fmt_x(_ratio(x['deflated_s'], x['stream_s']))})",
                    _fmt_x(x["deflated_peak"] / x["array_bytes"]),
                ]
            )
        parts.append(
            '**Size fitting** (`pack(max_size="25MB")`, never on the default path; '
            "the mechanism alone = compression plan + archive stream with those members "
            "deflated, ratio to the plain archive stream)\n\n"
            + _table(
                [
                    "weights",
                    "arrays",
                    "default archive",
                    "pack",
                    "pack(max_size=25MB)",
                    "its time (× default)",
                    "deflated archive",
                    "plan + deflated stream",
                    "peak RSS",
                ],
                rows,
            )
        )
    elif results.get("compress_error"):
        parts.append(f"**Size fitting**: {results['compress_error']}")
    rows = [
        [
            t["target"],
            _fmt_x(t["value"]),
            _fmt_x(t.get("best")),
            f"≤ {t['limit']:.2f}×",
            "met" if t["met"] else "MISSED",
        ]
        for t in results["targets"]
    ]
    if rows:
        parts.append(
            "**Targets** (issue 6; met/missed on the median ratio; best = ratio of the "
            "fastest repeats, what the machine gives without other work)\n\n"
            + _table(["target", "median", "best", "limit", ""], rows)
        )
    round2 = results.get("round2_targets") or []
    if round2:
        rows = []
        for t in round2:
            seconds = "(seconds)" in t["target"]
            show = _fmt_s if seconds else _fmt_x
            limit = _fmt_s(t["limit"]) if seconds else f"{t['limit']:.2f}×"
            rows.append(
                [
                    t["target"],
                    show(t["value"]),
                    show(t.get("best")),
                    f"≤ {limit}",
                    ("met" if t["met"] else "MISSED") + (f" ({t['note']})" if t.get("note") else ""),
                ]
            )
        parts.append(
            "**Targets, round 2** (issue 17; each a ratio of methods timed interleaved in one "
            "process; met/missed on the median, best = fastest repeats)\n\n"
            + _table(["target", "median", "best", "limit", ""], rows)
        )
    m = results["machine"]
    load = results["load_before"]
    parts.append(
        f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('ram_gib')} GiB RAM, "
        f"{m.get('filesystem')}; {m.get('platform')}; Python {m.get('python')}, jax {m.get('jax')}, "
        f"penzai {m.get('penzai')}, orbax-checkpoint {m.get('orbax-checkpoint')}, numpy {m.get('numpy')}. "
        f"Load average at start {load.get('loadavg_1m')}, at end {results['load_after'].get('loadavg_1m')}; "
        f"whole run {results['elapsed_s']:.0f} s."
    )
    return "\n\n".join(parts)


# ------------------------------------------------------------ issue 17's rows

ROUND2_TASKS = ("fixed", "perleaf", "find", "inspect")


def run_round2(args: argparse.Namespace, folder: str, results: dict, log: Any, say: Any) -> None:
    """Issue 17's rows, each in its own worker process; a failed row is reported, not fatal."""
    chosen = _names(args.round2)
    arguments = {
        "fixed": {"dir": folder, "repeats": 7, "self_check": not args.no_self_check},
        "perleaf": {"dir": folder, "repeats": 3, "leaves": args.per_leaf_count, "layers": 1000},
        "find": {"repeats": 5},
        "inspect": {
            "dir": folder,
            "repeats": 3,
            "counts": [args.inspect_arrays // 2, args.inspect_arrays],
        },
    }
    for task in ROUND2_TASKS:
        if task not in chosen:
            continue
        say(f"issue 17: {task}")
        try:
            results[task] = run_worker(task, arguments[task], log, args.verbose)
        except RuntimeError as error:
            results[task] = None
            results[f"{task}_error"] = str(error)
            say(f"{task} failed: {error}")


# ------------------------------------------------------------ main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", default=None, help="model sizes in MiB, comma-separated [16,256,1024]"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats per size [default: 7 below 64 MiB, 5 below 512 MiB, else 3 "
        "(2 for the alternatives)]",
    )
    parser.add_argument(
        "--leaf-counts",
        default=None,
        help="leaf counts for the scaling benchmark ('' to skip) [10,100,1000,10000]",
    )
    parser.add_argument(
        "--layer-counts",
        default=None,
        help="layer counts for the layer scaling benchmark ('' to skip) [10,100,1000]",
    )
    parser.add_argument(
        "--orbax-max-leaves",
        type=int,
        default=1000,
        help="largest leaf count orbax is timed at (~2 ms/leaf here) [%(default)s]",
    )
    parser.add_argument(
        "--compress-size",
        type=int,
        default=None,
        help="MiB of NaN-filled / 99%% zero weights for size fitting (0: skip) [128]",
    )
    parser.add_argument(
        "--process-repeats",
        type=int,
        default=None,
        help="repeats of the whole-process timings (0: skip) [5]",
    )
    parser.add_argument(
        "--round2",
        default=None,
        help="issue 17's target rows to run, comma-separated from "
        f"{','.join(ROUND2_TASKS)} ('' to skip) [all]",
    )
    parser.add_argument(
        "--only-round2",
        action="store_true",
        help="run only issue 17's rows (with the whole-process timings they need); "
        "sizes, leaf/layer scaling and size fitting are skipped",
    )
    parser.add_argument(
        "--per-leaf-count",
        type=int,
        default=None,
        help="leaves of the per-leaf target rows (also run at twice that) [10000]",
    )
    parser.add_argument(
        "--inspect-arrays",
        type=int,
        default=None,
        help="arrays of the largest inspect archive (also run at half that) [100000]",
    )
    parser.add_argument(
        "--no-alternatives", action="store_true", help="skip np.savez, orbax and pickle"
    )
    parser.add_argument("--no-self-check", action="store_true", help="skip timing the self-check")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="16 and 64 MiB, 3 repeats, up to 1,000 leaves (about 90 s); "
        "options given explicitly still apply",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for the files written (on the disk to measure) [a temp folder]",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON [%(default)s]")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the workers' progress")
    args = parser.parse_args(argv)
    quick = {
        "round2": ",".join(ROUND2_TASKS),
        "per_leaf_count": 2000,
        "inspect_arrays": 20000,
        "sizes": "16,64",
        "leaf_counts": "10,100,1000",
        "layer_counts": "10,100",
        "compress_size": 64,
        "process_repeats": 3,
        "repeats": 3,
    }
    full = {
        "round2": ",".join(ROUND2_TASKS),
        "per_leaf_count": 10000,
        "inspect_arrays": 100000,
        "sizes": ",".join(map(str, DEFAULT_SIZES)),
        "leaf_counts": ",".join(map(str, DEFAULT_LEAF_COUNTS)),
        "layer_counts": ",".join(map(str, DEFAULT_LAYER_COUNTS)),
        "compress_size": 128,
        "process_repeats": 5,
        "repeats": None,
    }
    if args.only_round2:
        for name, value in (
            ("sizes", ""),
            ("leaf_counts", ""),
            ("layer_counts", ""),
            ("compress_size", 0),
        ):
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(_names(args.round2)) - set(ROUND2_TASKS)
    if unknown:
        parser.error(f"--round2: unknown rows {', '.join(sorted(unknown))}")
    return args


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _repeats(size_mib: int, override: int | None) -> int:
    if override:
        return override
    return 7 if size_mib < 64 else 5 if size_mib < 512 else 3


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, prints the tables, writes the JSON; returns the results."""
    args = _parse(argv)
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="reprokit-bench-", dir=args.workdir)
    log_path = os.path.join(folder, "workers.log")
    results: dict[str, Any] = {
        "machine": machine_info(folder),
        "load_before": machine_load(),
        "cold_read_method": cold_method(),
        "workdir": folder,
        "sizes": [],
    }
    if results["load_before"]["loadavg_1m"] > 1.0:
        print(
            f"warning: load average {results['load_before']['loadavg_1m']} on "
            f"{os.cpu_count()} CPUs; other work skews every ratio",
            file=sys.stderr,
        )
    alternatives = not args.no_alternatives

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        with open(log_path, "w") as log:
            small = run_worker(
                "small", {"path": os.path.join(folder, "small.repro.zip")}, log, args.verbose
            )
            if args.process_repeats:
                say("whole-process timings")
                results["process"] = process_times(small["path"], args.process_repeats)
            for size_mib in _ints(args.sizes):
                reps = _repeats(size_mib, args.repeats)
                # The alternatives are context, not targets: fewer repeats at 1 GiB.
                alt_reps = reps if size_mib < 512 or args.repeats else 2
                size_dir = os.path.join(folder, f"{size_mib}MiB")
                os.makedirs(size_dir)
                say(f"{size_mib} MiB: write ({reps} repeats)")
                write = run_worker(
                    "write",
                    {
                        "bytes": size_mib * MIB,
                        "repeats": reps,
                        "dir": size_dir,
                        "alternative_repeats": alt_reps,
                        "alternatives": alternatives,
                        "self_check": not args.no_self_check,
                    },
                    log,
                    args.verbose,
                )
                say(f"{size_mib} MiB: cold read ({reps} repeats)")
                read = run_worker(
                    "read",
                    {
                        "paths": write["paths"],
                        "layout": write["layout"],
                        "repeats": reps,
                        "alternative_repeats": alt_reps,
                        "alternatives": alternatives,
                        "warmup_archive": small["path"],
                    },
                    log,
                    args.verbose,
                )
                results["cold_read_method"] = read["cold_method"]
                results["peak_rss_method"] = read["peak_method"]
                results["sizes"].append(_summarize_size(write, read))
                if not args.keep:
                    shutil.rmtree(size_dir)
            if _ints(args.leaf_counts) or _ints(args.layer_counts):
                say("leaf-count scaling")
                results["leaves"] = run_worker(
                    "leaves",
                    {
                        "counts": _ints(args.leaf_counts),
                        "layer_counts": _ints(args.layer_counts),
                        "dir": folder,
                        "repeats": 3,
                        "orbax_max": args.orbax_max_leaves if alternatives else -1,
                    },
                    log,
                    args.verbose,
                )
            run_round2(args, folder, results, log, say)
            if args.compress_size:
                say("size fitting")
                try:
                    results["compress"] = run_worker(
                        "compress",
                        {"bytes": args.compress_size * MIB, "dir": folder},
                        log,
                        args.verbose,
                    )
                except RuntimeError as error:
                    # Optional: report it, keep the rest of the run.
                    results["compress"] = None
                    results["compress_error"] = str(error)
                    say(f"size fitting failed: {error}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    results["load_after"] = machine_load()
    results["elapsed_s"] = time.perf_counter() - started
    results["targets"] = targets(results["sizes"], results.get("process"))
    results["round2_targets"] = round2_targets(results)
    table = render(results)
    results["table_markdown"] = table
    print(table)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    say(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
