"""Which release introduced (or fixed) an archive's issue, and does it reproduce on the latest?

`bisect` replays one archive under a range of releases of one package and
reports, per release tried, whether the recorded issue reproduced, and then
a conclusion in plain words. It assumes the outcome changes at most once
across the range (one change point) and says so; it replays both ends of
the range first, then binary-searches between them (`exhaustive` replays
every release instead, and then reports every change it saw).

What runs in each environment is never the archive's own `replay.py`, which
is reporter code: the archive is opened and verified here, under the
caller's limits and reprokit's allow-list, and a replay script is rendered
from the verified record by *this* reprokit (`views._script`), written with
the array payloads into a private folder, and run with the environment's
interpreter in isolated mode (`python -I`). Its `--json` verdict is parsed.

A release that cannot be installed, imported, or made to rebuild the layer
(a penzai class missing in that release) is reported as "cannot replay"
with the reason, and skipped: it counts neither as reproducing nor as not.

The search (`search`, `conclude`) takes the replay of one release as a
function, so its logic is tested without building environments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from reprokit._errors import (
    EXIT_NOT_REPRODUCED,
    EXIT_REPLAY_FAILED,
    EXIT_REPRODUCED,
    ArchiveError,
    RefusedTypeError,
    ReplayError,
    UsageError,
)
from reprokit.archive import _format

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
CANNOT_REPLAY = "cannot replay"
ASSUMPTION = (
    "assumes the outcome changes at most once across the range; --all replays every release"
)
EXIT_INCONCLUSIVE = EXIT_NOT_REPRODUCED
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MAX_LINE = 240


def one_line(text: Any, limit: int = _MAX_LINE) -> str:
    """`text` as one printable line, clipped: replay output may echo archive strings."""
    flat = " ".join(_CONTROLS.sub("", str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclasses.dataclass(frozen=True)
class BisectRow:
    """What one release did: installed set, outcome, and any error in one line."""

    version: str
    status: str  # REPRODUCED, NOT_REPRODUCED or CANNOT_REPLAY
    installed: dict[str, str] = dataclasses.field(default_factory=dict)
    output_bitwise_equal: bool | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    reason: str = ""  # the verdict's reason, or why the release cannot replay
    error: str = ""  # the replayed exception, or the failure, in one line
    seconds: float = 0.0

    @property
    def counted(self) -> bool:
        """Whether this row counts as good or bad (releases that cannot replay do not)."""
        return self.status != CANNOT_REPLAY

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BisectResult:
    """The table of releases tried and what it means; `reprokit.bisect` returns one."""

    archive: str
    package: str
    versions: tuple[str, ...]  # the candidate releases, oldest first
    rows: tuple[BisectRow, ...]  # releases tried, oldest first
    exhaustive: bool
    conclusion: str
    conclusive: bool
    change: str | None  # "introduced", "fixed", "none", "several", or None (nothing measured)
    last_good: str | None = None
    first_bad: str | None = None
    last_bad: str | None = None
    first_good: str | None = None
    latest: str | None = None  # the newest release on the index, when it was listed
    # Recorded XLA flags: `run` sets those its jaxlib knows; bisect sets none
    # (an unknown flag aborts an older XLA), so it says so.
    unset_xla_flags: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 conclusive, 1 inconclusive, 5 nothing could be replayed."""
        if not any(row.counted for row in self.rows):
            return EXIT_REPLAY_FAILED
        return EXIT_REPRODUCED if self.conclusive else EXIT_INCONCLUSIVE

    @property
    def notes(self) -> tuple[str, ...]:
        """Caveats the table implies: releases counted good although the layer raised."""
        notes = []
        other = [row.version for row in self.rows if row.status == NOT_REPRODUCED and row.error]
        if other:
            notes.append(
                f"on {', '.join(other)} the layer raised an error other than the recorded one: "
                "'not reproduced' there means the recorded issue did not occur, not that the layer works"
            )
        if self.unset_xla_flags:
            notes.append(
                "the archive records XLA flags that these replays did not set: "
                + one_line(" ".join(self.unset_xla_flags), 160)
            )
        skipped = [row.version for row in self.rows if not row.counted]
        if skipped and any(row.counted for row in self.rows):
            notes.append(
                f"{len(skipped)} release{'s' if len(skipped) > 1 else ''} could not be replayed "
                f"({', '.join(skipped)}): the conclusion covers only the others"
            )
        return tuple(notes)

    def row(self, version: str) -> BisectRow | None:
        return next((row for row in self.rows if row.version == version), None)

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["rows"] = [row.as_dict() for row in self.rows]
        data["assumption"] = None if self.exhaustive else ASSUMPTION
        data["exit_code"] = self.exit_code
        data["notes"] = list(self.notes)
        return data

    def format(self) -> str:
        """The table, one row per release tried, then the conclusion."""
        header = (self.package, "installed", "reproduced", "output", "error / reason")
        lines = []
        for row in self.rows:
            installed = " ".join(
                f"{name} {version}"
                for name, version in row.installed.items()
                if name != self.package
            )
            reproduced = {REPRODUCED: "yes", NOT_REPRODUCED: "no"}.get(row.status, "cannot replay")
            lines.append(
                (
                    row.version,
                    installed or "-",
                    reproduced,
                    _output_cell(row),
                    row.error or row.reason,
                )
            )
        widths = [
            max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
            for i in range(4)
        ]

        def render(cells):
            return (
                "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells[:4]))
                + "  "
                + cells[4]
            )

        out = [
            f"bisect {one_line(self.archive, 120)} over {self.package} ({len(self.versions)} releases"
            + (", all replayed)" if self.exhaustive else f", {len(self.rows)} replayed)")
        ]
        out += [render(header).rstrip()] + [render(line).rstrip() for line in lines]
        out.append("")
        out.append(self.conclusion)
        out += [f"note: {note}" for note in self.notes]
        if not self.exhaustive and len(self.rows) > 1:
            out.append(f"({ASSUMPTION})")
        return "\n".join(out)


def _output_cell(row: BisectRow) -> str:
    if row.status == CANNOT_REPLAY:
        return "-"
    if row.output_bitwise_equal:
        return "bitwise equal"
    if row.max_rel_error is not None:
        return f"max rel err {row.max_rel_error:.3g}"
    if row.max_abs_error is not None:
        return f"max abs err {row.max_abs_error:.3g}"
    return "differs" if row.output_bitwise_equal is False else "-"


# ------------------------------------------------------------------ versions


def parse_versions(spec: str | Sequence[str] | None, available: Sequence[str] | None) -> list[str]:
    """The releases to bisect, oldest first, from `A..B`, `A..latest`, `A..`, or a list.

    Ranges take the final releases on the index between A and B inclusive
    (`available`, oldest first); an explicit list (commas or spaces) is used
    as given, sorted, without asking the index whether each exists: one that
    does not is reported as "cannot replay".
    """
    from reprokit.bisecting._environments import is_release, version_key

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = ".."
    if isinstance(spec, str) and ".." in spec:
        low, _, high = (part.strip() for part in spec.partition(".."))
        if available is None:
            raise UsageError(
                "a range of versions needs the index's release list; give a list: --versions A,B,C"
            )
        for bound in (low, high):
            if bound and bound != "latest" and not is_release(bound):
                raise UsageError(f"--versions: {bound!r} is not a release number such as 0.4.35")
        chosen = [
            v
            for v in available
            if (not low or version_key(v) >= version_key(low))
            and (not high or high == "latest" or version_key(v) <= version_key(high))
        ]
        if not chosen:
            raise UsageError(f"--versions {spec}: the index has no release in that range")
        return chosen
    items = spec.replace(",", " ").split() if isinstance(spec, str) else [str(v) for v in spec]
    if not items:
        raise UsageError("--versions names no release")
    for item in items:
        if not is_release(item):
            raise UsageError(f"--versions: {item!r} is not a release number such as 0.4.35")
    return sorted(dict.fromkeys(items), key=version_key)


# ------------------------------------------------------------------ search


def search(
    versions: Sequence[str],
    replay_one: Callable[[str], BisectRow],
    *,
    exhaustive: bool = False,
) -> list[BisectRow]:
    """Replays releases until the one change point is found; returns the rows, oldest first.

    Both ends first (the outermost releases that can be replayed), then
    bisection between two releases whose outcomes differ; a release that
    cannot be replayed is skipped and its nearest untried neighbour taken.
    With `exhaustive`, every release is replayed.
    """
    rows: dict[int, BisectRow] = {}

    def status(index: int) -> str:
        if index not in rows:
            rows[index] = replay_one(versions[index])
        return rows[index].status

    count = len(versions)
    if exhaustive:
        for index in range(count):
            status(index)
        return [rows[i] for i in sorted(rows)]
    low = 0
    while low < count and status(low) == CANNOT_REPLAY:
        low += 1
    high = count - 1
    while high > low and status(high) == CANNOT_REPLAY:
        high -= 1
    if low < high and status(low) != status(high):
        while True:
            between = [i for i in range(low + 1, high) if rows.get(i) is None]
            if not between:
                break
            middle = (low + high) / 2
            index = min(between, key=lambda i: (abs(i - middle), i))
            outcome = status(index)
            if outcome == CANNOT_REPLAY:
                continue
            if outcome == status(low):
                low = index
            else:
                high = index
    return [rows[i] for i in sorted(rows)]


def _span(first: str, last: str) -> str:
    return first if first == last else f"{first}–{last}"


def conclude(
    package: str,
    versions: Sequence[str],
    rows: Sequence[BisectRow],
    *,
    latest: str | None = None,
    exhaustive: bool = False,
) -> dict:
    """The conclusion in plain words, and the change point, from the rows tried."""
    counted = [row for row in rows if row.counted]
    skipped = [row.version for row in rows if not row.counted]
    if not counted:
        return {
            "conclusion": f"could not replay the archive on any {package} release tried "
            f"({', '.join(skipped) or 'none'}); see the reasons above",
            "conclusive": False,
            "change": None,
        }
    is_latest = latest is not None and counted[-1].version == latest
    runs: list[list[BisectRow]] = []
    for row in counted:
        if runs and runs[-1][0].status == row.status:
            runs[-1].append(row)
        else:
            runs.append([row])
    first, last = counted[0].version, counted[-1].version
    if len(runs) == 1:
        reproduces = runs[0][0].status == REPRODUCED
        where = f"({_span(first, last)})"
        if len(counted) == 1:
            verb = "reproduces" if reproduces else "does not reproduce"
            text = f"{verb} on {package} {first}, the only release tried that could be replayed"
            text += " (the latest)" if is_latest else ""
        elif reproduces:
            text = f"reproduces on every {package} release tried {where}"
            text += ", latest included" if is_latest else ""
        else:
            text = f"does not reproduce on any {package} release tried {where}"
        return {"conclusion": text, "conclusive": True, "change": "none"}
    if len(runs) > 2:
        parts = [
            ("reproduces on " if run[0].status == REPRODUCED else "not on ")
            + _span(run[0].version, run[-1].version)
            for run in runs
        ]
        return {
            "conclusion": f"the outcome changes {len(runs) - 1} times across {package} releases: "
            + "; ".join(parts)
            + " (more than one change point: bisecting cannot name one release)",
            "conclusive": False,
            "change": "several",
        }
    before, after = runs
    left, right = before[-1].version, after[0].version
    position = {version: i for i, version in enumerate(versions)}
    # After the search, every release between the two could not be replayed.
    gap = list(versions[position[left] + 1 : position[right]])
    fixed = before[0].status == REPRODUCED
    if gap:
        plural = "s" if len(gap) > 1 else ""
        text = (
            f"{'fixed' if fixed else 'introduced'} in {package} {right} or in the "
            f"{len(gap)} release{plural} before it that could not be replayed ({', '.join(gap)}); "
            f"{'reproduces on' if fixed else 'last good'} {left}"
        )
        # The releases measured on either side; the change may lie in the gap.
        change = (
            {"change": "fixed", "last_bad": left, "first_good": right}
            if fixed
            else {"change": "introduced", "last_good": left, "first_bad": right}
        )
        return {**change, "conclusion": text, "conclusive": False}
    if fixed:
        text = f"reproduces on {package} {_span(first, left)}; fixed in {right} (first good)"
        return {
            "change": "fixed",
            "last_bad": left,
            "first_good": right,
            "conclusion": text,
            "conclusive": True,
        }
    text = f"introduced in {package} {right} (last good {left})"
    if last != right:
        text += f"; reproduces on {_span(right, last)}" + (", latest included" if is_latest else "")
    elif is_latest:
        text += "; reproduces on the latest"
    return {
        "change": "introduced",
        "last_good": left,
        "first_bad": right,
        "conclusion": text,
        "conclusive": True,
    }


# ------------------------------------------------------------------ replay in one environment


def _sanitized_manifest(manifest: dict) -> dict:
    """A copy whose header fields cannot leave the rendered script's comment lines."""
    clean = dict(manifest)
    # Every text about the layer (type, keypath, Flax path, ...) is printed in the header.
    clean["layer"] = {
        key: one_line(value, 200) if isinstance(value, str) else value
        for key, value in manifest["layer"].items()
    }
    call = manifest.get("call", {})
    clean["call"] = {
        **call,
        "index": call["index"] if type(call.get("index")) is int else 0,
        "count": call["count"] if type(call.get("count")) is int else 1,
    }
    for key in ("created", "reprokit_version"):
        clean[key] = one_line(manifest.get(key, "?"), 80)
    return clean


def render_script(manifest: dict, structure: dict) -> str:
    """The replay script this reprokit writes for a verified record.

    Free text from the manifest lands only in comments; the header is
    checked after rendering, so no archive string can become a statement.
    """
    from reprokit.views._script import render_replay_script

    try:
        script = render_replay_script(_sanitized_manifest(manifest), structure)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArchiveError(
            f"cannot render a replay script for this archive ({one_line(error, 120)})"
        ) from None
    except Exception as error:  # jinja2's UndefinedError: a field the template needs is missing
        raise ArchiveError(
            f"cannot render a replay script for this archive ({type(error).__name__})"
        ) from None
    header, marker, _ = script.partition("\nfrom __future__ import annotations\n")
    if not marker or any(line.strip() and not line.startswith("#") for line in header.splitlines()):
        raise ArchiveError(
            "the archive's text would leave the comments of the replay script; refused"
        )
    return script


def _workdir(opened: Any, script: str, trust_code: bool) -> str:
    """A private folder holding the rendered script and the archive's payloads (CRC-checked)."""
    from reprokit.archive import _checkpoint, _code

    manifest, structure, reader = opened.manifest, opened.structure, opened.reader
    if _checkpoint.member_names(manifest, reader.names):
        raise ReplayError(
            "this archive holds a multi-process checkpoint; reprokit bisect cannot replay it yet "
            "(use reprokit run under each release)"
        )
    files = _code.code_files(manifest)
    if files and not trust_code:
        raise RefusedTypeError(
            "the archive bundles the reporter's code, which would run in every environment: "
            "read it (reprokit inspect), then pass --trust-code"
        )
    folder = tempfile.mkdtemp(prefix="reprokit-bisect-")
    try:
        os.mkdir(os.path.join(folder, "arrays"))
        for index, desc in enumerate(structure["arrays"]):
            if desc.get("fill") is not None:
                continue
            # The name is built here from the index, never taken from the archive.
            data = reader.read_aligned(_format.array_member(index))
            data.tofile(os.path.join(folder, "arrays", f"{index}.bin"))
        for entry in files:
            source = _code.verified_source(reader, entry)
            target = os.path.join(folder, *entry["path"].split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as out:
                out.write(source)
        with open(os.path.join(folder, "replay.py"), "w", encoding="utf-8") as out:
            out.write(script)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


# What every rendered script needs before it rebuilds anything (it then imports
# only the modules the record names, so a release may replay with a partly broken penzai).
_IMPORT_PROBE = "import jax, jax.numpy as jnp, penzai, numpy; jnp.zeros(1).block_until_ready()"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return one_line(lines[-1]) if lines else "no output"


def _parse_verdict(stdout: str) -> dict | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\{", stdout, flags=re.MULTILINE):
        try:
            value, _ = decoder.raw_decode(stdout[match.start() :])
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("reproduced"), bool):
            return value
    return None


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def row_from_verdict(version: str, installed: dict, verdict: dict, seconds: float) -> BisectRow:
    """A table row from the rendered script's `--json` verdict."""
    # Leaves the record has (an exception record has none: nothing to compare).
    outputs = [
        row
        for row in verdict.get("output") or []
        if isinstance(row, dict) and row.get("status") != "unexpected"
    ]
    abs_errors = [_float_or_none(row.get("max_abs_error")) for row in outputs]
    rel_errors = [_float_or_none(row.get("max_rel_error")) for row in outputs]
    abs_errors = [e for e in abs_errors if e is not None]
    rel_errors = [e for e in rel_errors if e is not None]
    exception = verdict.get("replayed_exception")
    error = ""
    if isinstance(exception, dict):
        error = f"{exception.get('type', '?')}: {exception.get('message', '')}"
    bitwise = all(row.get("bitwise_equal") is True for row in outputs)
    return BisectRow(
        version=version,
        status=REPRODUCED if verdict["reproduced"] else NOT_REPRODUCED,
        installed=installed,
        output_bitwise_equal=bitwise if outputs else None,
        max_abs_error=max(abs_errors) if abs_errors else None,
        max_rel_error=max(rel_errors) if rel_errors else None,
        reason=one_line(verdict.get("reason", "")),
        error=one_line(error) if error else "",
        seconds=round(seconds, 2),
    )


class _Replayer:
    """Replays the rendered script under one release of `package` per call."""

    def __init__(
        self,
        workdir: str,
        builder: Any,
        package: str,
        jaxlib_versions,
        timeout: float,
        extra: tuple[str, ...] = (),
    ):
        self.workdir = workdir
        self.extra = extra
        self.builder = builder
        self.package = package
        self.jaxlib_versions = jaxlib_versions
        self.timeout = timeout
        self.advance: Callable[[float], None] = lambda amount=1: None

    def __call__(self, version: str) -> BisectRow:
        from reprokit.bisecting._environments import InstallFailed, requirements

        started = time.monotonic()

        def cannot(reason: str, installed: dict | None = None) -> BisectRow:
            return BisectRow(
                version,
                CANNOT_REPLAY,
                installed or {},
                reason=one_line(reason),
                error=one_line(reason),
                seconds=round(time.monotonic() - started, 2),
            )

        try:
            environment = self.builder.build(
                requirements(self.package, version, self.jaxlib_versions, self.extra),
                f"{self.package}-{version}",
            )
        except InstallFailed as failure:
            self.advance(2)
            return cannot(str(failure))
        self.advance(1)
        try:
            installed = environment.installed
            done = self._run([environment.python, "-I", "replay.py", "--json"])
            verdict = _parse_verdict(done.stdout)
            if verdict is None:
                # Which step failed: importing the libraries, or rebuilding the layer?
                probe = self._run([environment.python, "-I", "-c", _IMPORT_PROBE])
                if probe.returncode != 0:
                    return cannot(
                        f"cannot import jax or penzai: {_last_line(probe.stderr)}", installed
                    )
                return cannot(
                    f"cannot rebuild or run the layer: {_last_line(done.stderr)}", installed
                )
            return row_from_verdict(version, installed, verdict, time.monotonic() - started)
        except subprocess.TimeoutExpired:
            return cannot(f"the replay took more than {self.timeout:.0f} s", environment.installed)
        finally:
            self.advance(1)

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "1")
        return subprocess.run(
            command,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )


def bisect(
    path: str | os.PathLike,
    *,
    package: str = "jax",
    versions: str | Sequence[str] | None = None,
    exhaustive: bool = False,
    python: str | None = None,
    index_url: str | None = None,
    offline: bool = False,
    limits: Any = None,
    trust_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 900,
) -> BisectResult:
    """Replays the archive at `path` under releases of `package` and finds where its issue changed.

    Args:
      path: a `.repro.zip` archive (opened and verified here; its own
        `replay.py` is never run).
      package: "jax" (default; jaxlib pinned alongside), "penzai", "numpy" or "ml_dtypes".
      versions: "0.4.35..latest", "0.4.35..0.6.0", "0.5.0.." or a list such as
        "0.4.35,0.5.0,0.6.0"; default: from the release the archive was
        packed with to the latest, else the last ten releases.
      exhaustive: replay every release instead of binary-searching (`--all`).
      python: the interpreter for the environments ("3.11", a path); default: this one.
      index_url: package index; default: pip's configured index, else PyPI.
      offline: use only what uv has cached (no network); ranges then cover the
        releases whose environments were built before.
      limits: `reprokit.archive._container.Limits` for opening the archive.
      trust_code: let the archive's bundled code run in the environments.
      cache_dir: where environments are cached; default `~/.cache/reprokit/bisect`.
      timeout: seconds each replay may take.

    Returns:
      A `BisectResult`: `.rows` (one per release tried), `.conclusion`,
      `.first_bad` / `.first_good` ..., `.format()`, `.as_dict()`, `.exit_code`.

    Raises:
      ArchiveError: the archive is invalid or refused (nothing was run).
      ReplayError: uv is missing, or the index cannot be reached.
      UsageError: a bad package or version list.
    """
    from reprokit._progress import progress
    from reprokit.archive._open import open_archive
    from reprokit.bisecting import _environments
    from reprokit.views._script import needs_flax

    if package not in _environments.BISECTABLE:
        raise UsageError(
            f"--package must be one of {', '.join(_environments.BISECTABLE)}, not {package!r}"
        )
    path = os.fspath(path)
    # Everything about the archive is checked before any environment is built.
    opened = open_archive(path, limits, allow_modules=(), verify_members=True)
    try:
        script = render_script(opened.manifest, opened.structure)
        extra = ("flax",) if needs_flax(opened.structure) else ()
        workdir = _workdir(opened, script, trust_code)
    finally:
        opened.close()
    try:
        builder = _environments.Builder(
            python=python,
            index_url=index_url if index_url is not None else _environments.configured_index_url(),
            offline=offline,
            cache_dir=cache_dir,
        )
        available: list[str] | None = None
        jaxlib_versions: set[str] | None = None
        needs_listing = versions is None or (isinstance(versions, str) and ".." in versions)
        if offline:
            available = _cached_versions(builder.cache, package) if needs_listing else None
        else:
            if needs_listing:
                available = _environments.list_versions(package, builder.index_url)
            if package == "jax":
                jaxlib_versions = set(_environments.list_versions("jaxlib", builder.index_url))
        if versions is None and available:
            versions = _default_range(opened.manifest, package, available)
        candidates = parse_versions(versions, available)
        latest = available[-1] if available and not offline else None
        replayer = _Replayer(workdir, builder, package, jaxlib_versions, timeout, extra)
        expected = (
            len(candidates)
            if exhaustive
            else min(len(candidates), 2 + (len(candidates) - 1).bit_length())
        )
        with progress(2 * expected, f"bisecting {package}") as advance:
            replayer.advance = advance
            rows = search(candidates, replayer, exhaustive=exhaustive)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = conclude(package, candidates, rows, latest=latest, exhaustive=exhaustive)
    return BisectResult(
        archive=path,
        package=package,
        versions=tuple(candidates),
        rows=tuple(rows),
        exhaustive=exhaustive,
        latest=latest,
        unset_xla_flags=tuple(
            flag
            for flag in opened.manifest["environment"].get("xla_flags", [])
            if isinstance(flag, str)
        ),
        **summary,
    )


def _default_range(manifest: dict, package: str, available: list[str]) -> str:
    """The recorded release to the latest (is it fixed?), else the last ten releases."""
    from reprokit.bisecting._environments import version_key

    recorded = (manifest["environment"].get("packages") or {}).get(package)
    if isinstance(recorded, str) and recorded in available and recorded != available[-1]:
        return f"{recorded}..latest"
    return ",".join(v for v in available[-10:] if version_key(v) <= version_key(available[-1]))


def _cached_versions(cache: Any, package: str) -> list[str]:
    """Releases of `package` whose environments are cached (what --offline can replay)."""
    from reprokit.bisecting._environments import is_release, version_key

    found = set()
    for entry in cache.glob(f"{package}-*-py*"):
        version = entry.name[len(package) + 1 :].split("-py", 1)[0]
        if is_release(version):
            found.add(version)
    if not found:
        raise UsageError(
            f"--offline: no {package} environment is cached yet; give the releases with --versions A,B,C"
        )
    return sorted(found, key=version_key)
