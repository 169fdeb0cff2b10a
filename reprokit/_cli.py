"""The `reprokit` command line: pack, run, inspect, verify.

Verbs are click subcommands. Every failure a user can cause ends as one
line on stderr and a documented exit code; `--debug` shows the traceback.
`run` reads the manifest before jax is imported, so recorded XLA flags can
still be put in force.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Iterator

import click

from reprokit._errors import (
    EXIT_INVALID_ARCHIVE,
    EXIT_NOT_REPRODUCED,
    EXIT_PACK_FAILED,
    EXIT_REPLAY_FAILED,
    EXIT_REPRODUCED,
    EXIT_USAGE,
    ReprokitError,
    UsageError,
)
from reprokit.archive._container import Limits

# Lives here, not beside the placement code: the CLI must not import replay
# code just to print its help (`reprokit verify` loads no replay module).
_MESH_HELP = (
    "Where to place sharded arrays: auto (the recorded mesh if this machine has enough "
    "devices, else one device), recorded, 1 (one device), or a mesh such as data=2,model=4."
)

EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_REPRODUCED}  reproduced (run; with --expect fixed: not reproduced) / success
  {EXIT_NOT_REPRODUCED}  not reproduced (run; with --expect fixed: still reproduced)
  {EXIT_USAGE}  usage error: bad option, target or selection
  {EXIT_INVALID_ARCHIVE}  invalid, corrupted or refused archive (nothing was run)
  {EXIT_PACK_FAILED}  packing failed (nothing captured, or a value cannot be saved)
  {EXIT_REPLAY_FAILED}  the archive is valid but cannot be replayed here"""


@contextlib.contextmanager
def _reported_errors(debug: bool, unexpected_exit: int) -> Iterator[None]:
    """Turns errors into one line and an exit code; tracebacks only with --debug."""
    try:
        yield
    except ReprokitError as error:
        if debug:
            traceback.print_exc()
        click.echo(f"reprokit: error: {one_line(str(error))}", err=True)
        _echo_error_json(str(error), error.exit_code)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, SystemExit, click.exceptions.Exit):
        raise
    except Exception as error:
        if debug:
            traceback.print_exc()
        message = " ".join(f"{type(error).__name__}: {error}".split())[:500]
        click.echo(
            f"reprokit: error: {one_line(message)} (rerun with --debug for the traceback)", err=True
        )
        _echo_error_json(message, unexpected_exit)
        sys.exit(unexpected_exit)


def _echo_text(text: str, **options: object) -> None:
    """Print text that holds archive strings: controls, bidi and invisible characters escaped."""
    from reprokit.archive._format import terminal_safe

    click.echo(terminal_safe(text), **options)


def one_line(text: str) -> str:
    from reprokit.archive._format import one_line as escape

    return escape(text)


def _echo_error_json(message: str, exit_code: int) -> None:
    """With --json, stdout holds one JSON object on failure too (scripts parse every outcome)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json"):
        click.echo(json.dumps({"error": message, "exit_code": exit_code}, indent=1))


class _JsonGroup(click.Group):
    """The verbs' group: with --json, click's own usage errors are JSON on stdout as well."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv or not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            error.show()
            click.echo(
                json.dumps({"error": error.format_message(), "exit_code": error.exit_code}, indent=1)
            )
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            click.echo(json.dumps({"error": "aborted", "exit_code": 1}, indent=1))
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show tracebacks of errors.")(fn)


def _echo_measured_json(payload: dict) -> None:
    """Prints a verdict or pack result: errors may be infinite, and must still be JSON."""
    from reprokit.portable._verdict import json_ready

    click.echo(json.dumps(json_ready(payload), indent=1, default=str, allow_nan=False))


def _json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def _quiet_option(fn):
    return click.option(
        "-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit code tells."
    )(fn)


def _check_output_options(as_json: bool, quiet: bool) -> None:
    """--json and --quiet contradict each other; say so instead of picking one."""
    if as_json and quiet:
        raise UsageError("choose one of --json and --quiet")
    from reprokit import _progress

    _progress.silenced = as_json or quiet


def _allow_module_option(fn):
    return click.option(
        "--allow-module",
        "allow_modules",
        multiple=True,
        metavar="MODULE",
        help="Also rebuild classes and functions from MODULE (your own code; repeatable). "
        "Only for modules you trust: they are imported.",
    )(fn)


class _ByteSize(click.ParamType):
    """A size in bytes: 1000000, 512K, 64M, 300G (binary units)."""

    name = "SIZE"
    _UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "")
        try:
            size = float(number) * self._UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size such as 1000000, 512K, 64M or 300G", param, ctx)
        if not 0 <= size < 2**63:
            self.fail(f"{value!r} is out of range", param, ctx)
        return int(size)


# Limits are kept in the click context rather than passed as parameters, so
# that each command's signature stays what it was.
_LIMIT_OPTIONS = (
    ("--max-total-size", "max_total_bytes", _ByteSize(), "Limit on all data, uncompressed"),
    ("--max-members", "max_members", click.IntRange(0), "Limit on the number of members"),
    ("--max-member-size", "max_small_member_bytes", _ByteSize(), "Limit on the manifest or text"),
    ("--max-compression-ratio", "max_compression_ratio", click.FloatRange(0), "Zip bomb limit"),
)


def _limits_options(fn):
    for flag, field, kind, what in reversed(_LIMIT_OPTIONS):
        default = getattr(Limits(), field)
        if isinstance(kind, _ByteSize):
            factor, unit = max((f, u) for u, f in _ByteSize._UNITS.items() if default % f == 0)
            default = f"{default // factor}{unit}"

        def remember(ctx, param, value, field=field):
            if value is not None:
                ctx.meta.setdefault("reprokit_limits", {})[field] = value

        fn = click.option(
            flag,
            type=kind,
            default=None,
            expose_value=False,
            callback=remember,
            help=f"{what} [default: {default}]; raise it only for an archive you trust.",
        )(fn)
    return fn


def _limits() -> Limits:
    """The limits given on the command line, defaults elsewhere."""
    ctx = click.get_current_context(silent=True)
    return Limits(**(ctx.meta.get("reprokit_limits", {}) if ctx else {}))


@click.group(
    cls=_JsonGroup,
    epilog=EXIT_CODES_HELP,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="reprokit", message="reprokit %(version)s")
def main() -> None:
    """Pack a failing JAX/penzai layer into one .repro.zip that anyone can replay.

    \b
    Reporter:    reprokit pack script.py:make_call --list
                 reprokit pack script.py:make_call --select 'MLP.sublayers[2]' -o bug.repro.zip
    Maintainer:  reprokit inspect bug.repro.zip && reprokit run bug.repro.zip
    """


# ------------------------------------------------------------------ pack


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("target")
@click.option(
    "--select",
    "keypath",
    metavar="KEYPATH",
    help="The layer to pack, as pz.pretty_keystr prints it, e.g. 'MLP.sublayers[2]/Affine.sublayers[0]' (see --list).",
)
@click.option(
    "--find",
    "find_check",
    type=click.Choice(["nonfinite", "exception", "mismatch", "inf"]),
    default=None,
    help="Instead of --select: find the misbehaving layer in one instrumented pass (innermost "
    "layer with well-behaved inputs), then pack it; the archive records how it was found. "
    "nonfinite follows a NaN to the layer that made it (a mask's -inf is by design); inf "
    "blames the first layer returning NaN/Inf. "
    "With --find, --mode runs the whole model eagerly or under jit.",
)
@click.option(
    "--explain",
    is_flag=True,
    help="With --find: print the layer tree with each layer's status, culprit marked.",
)
@click.option(
    "--grad",
    "grad_target",
    default=None,
    metavar="SCRIPT:LOSS",
    help="A gradient issue (finite forward pass, NaN gradient): path/to/script.py:loss, "
    "loss(output) -> scalar. With --find nonfinite|exception it finds the layer whose "
    "backward pass goes wrong; the archive records the cotangent at the layer's output.",
)
@click.option(
    "-o", "--out", default=None, metavar="FILE", help="Archive to write [default: LAYER.repro.zip]."
)
@click.option(
    "--call",
    type=int,
    default=None,
    help="Which call of the layer to pack (0-based) [default: first that misbehaves].",
)
@click.option(
    "--signature",
    type=click.Choice(["exception", "nonfinite", "output"]),
    default=None,
    help="The recorded issue [default: detected].",
)
@click.option(
    "--mode",
    type=click.Choice(["eager", "jit"]),
    default=None,
    help="Run the layer eagerly or under jax.jit [default: jit inside penzai's Jitted, else eager].",
)
@click.option("--note", default="", help="A note for the maintainer.")
@click.option(
    "--redact",
    multiple=True,
    metavar="WHAT=HOW",
    help="Replace private values: params=random|zeros|shapes, inputs=random|zeros|shapes "
    "(repeatable). Weaker redactions are tried until the issue still reproduces.",
)
@click.option(
    "--max-size",
    default=None,
    metavar="SIZE",
    help="Fit the archive under SIZE (e.g. 25MB, GitHub's limit): compress, zero unneeded "
    "parameters, or refuse.",
)
@click.option(
    "--compress",
    is_flag=True,
    help="Deflate each array that shrinks by a tenth or more (slower to pack; replay reads "
    "it the same way). --max-size does this by itself.",
)
@click.option(
    "--check/--no-check",
    default=True,
    help="Replay the finished archive in a fresh process and record whether it reproduces "
    "[default: check].",
)
@click.option(
    "--list",
    "list_layers",
    is_flag=True,
    help="List the model's layers with their keypaths and exit.",
)
@click.option(
    "--bundle-code",
    is_flag=True,
    help="Copy the source of your own modules the layer needs (and of classes defined in "
    "the script) into the archive, with their sha256; maintainers import it only with "
    "reprokit run --trust-code.",
)
@click.option(
    "--gather",
    is_flag=True,
    help="Several jax processes: gather arrays no process holds whole to every process "
    "instead of writing their shards with orbax (small layers only).",
)
@click.option(
    "--shards-dir",
    default=None,
    metavar="DIR",
    help="Several jax processes: a folder all of them can reach, where each writes its "
    "shards [default: next to the archive].",
)
@_json_option
@_quiet_option
@_allow_module_option
@_debug_option
def pack(
    target,
    keypath,
    out,
    call,
    signature,
    mode,
    note,
    redact,
    max_size,
    check,
    list_layers,
    allow_modules,
    debug,
    as_json=False,
    quiet=False,
    find_check=None,
    explain=False,
    bundle_code=False,
    gather=False,
    shards_dir=None,
    compress=False,
    grad_target=None,
):
    """Run TARGET's model once and pack the selected layer's call into an archive.

    TARGET is path/to/script.py:make_call or package.module:make_call; make_call()
    returns (model, argument) or (model, argument, side_inputs).

    \b
    Example:
      reprokit pack examples/nan_attention.py:make_call \\
          --select 'TransformerLM.body/Sequential.sublayers[2]/TransformerBlock.sublayers[0]/Residual.delta/Sequential.sublayers[1]' \\
          -o attn-nan.repro.zip
    """
    with _reported_errors(debug, EXIT_PACK_FAILED):
        from reprokit.capture._target import all_layers, call_target, load_target, select_keypath

        _check_output_options(as_json, quiet)
        fn = load_target(target)
        model, argument, side_inputs = call_target(fn, target)
        if list_layers:
            from reprokit.capture._target import flax_paths

            layers = all_layers(model)
            flax = flax_paths(model)  # unflaxified Flax models: their module paths too
            if as_json:
                rows = [
                    {"keypath": p, "type": k, **({"flax_path": flax[p]} if p in flax else {})}
                    for p, k in layers
                ]
                click.echo(json.dumps(rows, indent=1))
            elif not quiet:
                for path, kind in layers:
                    extra = f"  [flax {flax[path]}]" if path in flax else ""
                    click.echo(f"{kind:32} {path or '(root)'}{extra}")
            return
        loss = load_target(grad_target) if grad_target else None
        if find_check and (gather or shards_dir):
            raise UsageError("--gather and --shards-dir (several processes) go with --select")
        from reprokit.capture._options import PackOptions

        options = PackOptions(
            note=note,
            call=call,
            signature=signature,
            mode=mode,
            allow_modules=allow_modules,
            check=check,
            redact=list(redact),
            max_size=max_size,
            bundle_code=bundle_code,
            compress=compress,
            gather=gather,
            shards_dir=shards_dir,
        )
        if find_check:
            _find_and_pack(
                model,
                argument,
                side_inputs,
                find_check,
                keypath=keypath,
                explain=explain,
                out=out,
                as_json=as_json,
                quiet=quiet,
                options=options,
                loss=loss,
            )
            return
        if explain:
            raise UsageError("--explain goes with --find CHECK")
        if not keypath:
            raise UsageError(
                "choose the layer with --select KEYPATH (list them with --list), or let "
                "--find nonfinite|exception|mismatch find it"
            )
        from reprokit.capture._pack import pack_selection

        selection = select_keypath(model, keypath)
        out = out or f"{type(selection.get()).__name__.lower()}.repro.zip"
        result = pack_selection(
            selection, argument, side_inputs=side_inputs, out=out, options=options, grad=loss
        )
        if as_json:
            _echo_measured_json(dataclasses.asdict(result))
        elif not quiet:
            click.echo(result.summary())


def _find_and_pack(
    model,
    argument,
    side_inputs,
    find_check,
    *,
    keypath,
    explain,
    out,
    as_json,
    quiet,
    options,
    loss=None,
):
    """`pack --find CHECK`: locate the layer (reprokit.search), then pack the call it found.

    `options.mode` is the mode the search runs the model in; the call is the one it finds.
    """
    from penzai import pz

    from reprokit.capture._find import pack_found, search

    if keypath:
        raise UsageError("pass either --select KEYPATH or --find CHECK, not both")
    if options.call is not None:
        raise UsageError("--find picks the call that misbehaved; drop --call")
    if not isinstance(model, pz.nn.Layer):
        raise UsageError(
            f"the target returned a {type(model).__name__} as model, not a pz.nn.Layer"
        )
    try:
        found = search(
            model,
            argument,
            side_inputs=side_inputs,
            check=find_check,
            mode=options.mode,
            grad=loss,
        )
    except ReprokitError as error:
        if explain and getattr(error, "report", None) and not as_json:
            click.echo(error.report)
        raise
    if explain and not as_json:
        click.echo(found.report)
        click.echo()
    result = pack_found(
        found,
        out=out or f"{found.layer_type.rsplit('.', 1)[-1].lower()}.repro.zip",
        options=options,
    )
    if as_json:
        payload = {**dataclasses.asdict(result), "found_by": found.found_by}
        if explain:
            payload["report"] = found.report
        _echo_measured_json(payload)
    elif not quiet:
        where = f"call {found.call_index + 1} of {found.call_count}"
        click.echo(f"found by --find {find_check}: {found.keypath} ({where})")
        click.echo(result.summary())


# ------------------------------------------------------------------ run


def _put_recorded_xla_flags(manifest: dict) -> list[str]:
    """Sets the archive's XLA flags before jax starts; returns notes on flags left out."""
    if "jax" in sys.modules:
        return []
    flags = manifest["environment"].get("xla_flags") or []
    flags = [f for f in flags if isinstance(f, str)]
    current = os.environ.get("XLA_FLAGS", "").split()
    if not flags or flags == current:
        return []
    from reprokit.environment._config import check_xla_flags, replayable_xla_flags, xla_flag_note

    flags, left_out = replayable_xla_flags(flags)
    accepted, rejected = check_xla_flags(flags)
    os.environ["XLA_FLAGS"] = " ".join(accepted)
    notes = [xla_flag_note(flag) for flag in left_out]
    return notes + [
        f"recorded XLA flag {flag} is unknown to this jaxlib; left out" for flag in rejected
    ]


_trust_code_option = click.option(
    "--trust-code",
    is_flag=True,
    help="Import the reporter's code bundled in the archive (pack --bundle-code). It runs "
    "with your permissions: read it first (reprokit inspect lists it).",
)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option(
    "--repeat",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Replay N times (fresh compile each time); report whether all results are bitwise identical.",
)
@click.option(
    "--sweep",
    is_flag=True,
    help="Also replay under eager/jit, matmul precision, x64, each platform, XLA flags "
    "and the StableHLO artifact, and print a table.",
)
@click.option(
    "--reference",
    type=click.Choice(["float64", "highest", "eager", "cpu"]),
    default=None,
    help="Compare recorded and replayed output with a reference computation.",
)
@click.option(
    "--stablehlo",
    is_flag=True,
    help="Replay the archive's StableHLO artifact instead of the penzai layer "
    "(if it still reproduces, the bug is below penzai).",
)
@click.option(
    "--expect",
    type=click.Choice(["reproduced", "fixed"]),
    default="reproduced",
    show_default=True,
    help="What counts as success (exit 0): the issue reproducing, or it being fixed (for CI).",
)
@click.option("--mesh", default=None, metavar="MESH", help=_MESH_HELP)
@_trust_code_option
@_quiet_option
@_allow_module_option
@_limits_options
@_debug_option
def run(
    archive,
    as_json,
    repeat,
    sweep,
    reference,
    stablehlo,
    allow_modules,
    debug,
    expect="reproduced",
    quiet=False,
    mesh=None,
    trust_code=False,
):
    """Replay ARCHIVE and say whether the recorded issue reproduces here.

    Checks every member, restores the recorded jax configuration and XLA flags,
    rebuilds the layer from reprokit's allow-list (never unpickling or running
    code from the archive; bundled code only with --trust-code), places sharded
    arrays on the recorded mesh or one device (--mesh), calls it in the recorded
    mode (eager or jit), and
    compares the outcome with the recorded one: bitwise, or max abs/rel error per
    output leaf. The exit code follows the main verdict, not the extra checks.

    \b
    Examples:
      reprokit run bug.repro.zip
      reprokit run bug.repro.zip --repeat 10      # nondeterministic?
      reprokit run bug.repro.zip --sweep          # which conditions reproduce?
      reprokit run bug.repro.zip --reference float64
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE):
        _check_output_options(as_json, quiet)
        from reprokit.archive._open import open_archive
        from reprokit.archive._trust import TrustPolicy

        trust = TrustPolicy(allow_modules, trust_code)
        # Opened once, before jax starts: the recorded XLA flags must be set first.
        opened = open_archive(archive, _limits(), allow_modules=trust.modules)
        try:
            script = _replay_script_status(opened)
            notes = _put_recorded_xla_flags(opened.manifest)
        except BaseException:
            opened.close()
            raise
        from reprokit.replaying import _variants
        from reprokit.replaying._replay import load_archive, replay_loaded

        loaded = load_archive(opened, trust, mesh=mesh)
        verdict = replay_loaded(loaded, stablehlo=stablehlo)
        if notes:
            verdict = _with_notes(verdict, notes)
        extras: dict = {}
        if repeat:
            extras["repeat"] = _variants.repeat(loaded, repeat)
        if reference:
            extras["reference"] = _variants.reference(
                archive, loaded, reference, trust, limits=_limits()
            )
        if sweep:
            extras["sweep"] = _variants.sweep(archive, loaded, trust, limits=_limits())
        # Only once there is a verdict: a refusal or a replay error stays the one line on stderr.
        _warn_if_replay_script_differs(script)
        if as_json:
            payload = verdict.as_dict()
            if "sweep" in extras:
                extras["sweep"] = [dataclasses.asdict(row) for row in extras["sweep"]]
            payload.update(extras)
            payload.update(
                expected=expect, as_expected=verdict.reproduced == (expect == "reproduced")
            )
            _echo_measured_json(payload)
        elif not quiet:
            # The replayed layer's exception messages and the archive's strings
            # reach the terminal escaped (SECURITY.md, class 7).
            _echo_text(verdict.format())
            if "repeat" in extras:
                _echo_text(_format_repeat(extras["repeat"]))
            if "reference" in extras:
                _echo_text(_variants.format_reference(extras["reference"]))
            if "sweep" in extras:
                _echo_text(_variants.format_sweep(extras["sweep"]))
        if expect == "fixed" and not (as_json or quiet):
            click.echo(
                "expect fixed: FAILED, the recorded issue still reproduces"
                if verdict.reproduced
                else "expect fixed: OK, the recorded issue no longer reproduces"
            )
        # --expect fixed swaps the meaning of 0 and 1: success is the fix.
        as_expected = verdict.reproduced == (expect == "reproduced")
        sys.exit(EXIT_REPRODUCED if as_expected else EXIT_NOT_REPRODUCED)


def _replay_script_status(opened) -> str:
    from reprokit.views._script import replay_script_status

    return replay_script_status(opened)


def _warn_if_replay_script_differs(status: str) -> None:
    """run does not execute replay.py, but a maintainer may: say when it is not ours."""
    from reprokit.views._script import replay_script_line

    if status == "differs":
        click.echo(f"reprokit: warning: {replay_script_line('differs')}", err=True)


def _format_repeat(report: dict) -> str:
    if report["bitwise_identical"]:
        return f"repeat: {report['runs']} replays, all bitwise identical"
    diff = report["first_difference"]
    where = f"{diff['path']}{diff.get('index', '')}"
    if "first_run" in diff:
        values = f": {diff['first_run']} vs {diff['this_run']}"
    else:
        values = f" ({diff.get('detail')})"
    return f"repeat: NONDETERMINISTIC: replay {diff['run'] + 1} differs from replay 1 at {where}{values}"


def _with_notes(verdict, notes):
    return dataclasses.replace(verdict, notes=tuple(notes) + verdict.notes)


# ------------------------------------------------------------------ bisect

BISECT_EXIT_CODES_HELP = f"""\b
Exit codes (bisect):
  {EXIT_REPRODUCED}  conclusive: the change point was found, or nothing changed in the range
  {EXIT_NOT_REPRODUCED}  inconclusive: the change lies among releases that could not be replayed,
     or (--all) the outcome changed more than once
  {EXIT_USAGE}  usage error: bad option, package or version list
  {EXIT_INVALID_ARCHIVE}  invalid, corrupted or refused archive (nothing was run)
  {EXIT_REPLAY_FAILED}  no release could be replayed, uv is missing, or the index is unreachable"""


@main.command(epilog=BISECT_EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option(
    "--package",
    type=click.Choice(["jax", "penzai", "numpy", "ml_dtypes"]),
    default="jax",
    show_default=True,
    help="The package whose releases are bisected (for jax, jaxlib is pinned alongside).",
)
@click.option(
    "--versions",
    default=None,
    metavar="RANGE|LIST",
    help="0.4.35..latest, 0.4.35..0.6.0, 0.5.0.. or a list 0.4.35,0.5.0,0.6.0 "
    "[default: from the release recorded in ARCHIVE to the latest].",
)
@click.option("--all", "exhaustive", is_flag=True, help="Replay every release instead of bisecting.")
@click.option("--python", default=None, metavar="VERSION", help="Python for the environments, e.g. 3.11 [default: this one].")
@click.option("--index-url", default=None, metavar="URL", help="Package index [default: pip's configured index].")
@click.option("--offline", is_flag=True, help="Use only packages uv has cached (no network).")
@_json_option
@_trust_code_option
@_quiet_option
@_limits_options
@_debug_option
def bisect(
    archive, package, versions, exhaustive, python, index_url, offline, as_json, trust_code, quiet, debug
):
    """Find the release of jax (or penzai, numpy, ml_dtypes) where ARCHIVE's issue changed.

    Replays ARCHIVE in one throwaway environment per release (built with uv,
    cached under ~/.cache/reprokit/bisect): the release pinned, the other
    packages the newest compatible. Both ends of the range are replayed first,
    then releases between them by binary search, assuming the outcome changes
    at most once. The replay script is rendered from the verified record by
    this reprokit; the archive's own replay.py never runs. A release that cannot
    be installed, imported or made to rebuild the layer is shown as "cannot
    replay" and skipped.

    \b
    Examples:
      reprokit bisect bug.repro.zip --versions 0.4.35..latest
      reprokit bisect bug.repro.zip --versions 0.5.0,0.6.0,0.7.0 --all
      reprokit bisect bug.repro.zip --package penzai --json
    """
    with _reported_errors(debug, EXIT_REPLAY_FAILED):
        _check_output_options(as_json, quiet)
        from reprokit.bisecting._bisect import bisect as run_bisect

        result = run_bisect(
            archive,
            package=package,
            versions=versions,
            exhaustive=exhaustive,
            python=python,
            index_url=index_url,
            offline=offline,
            limits=_limits(),
            trust_code=trust_code,
        )
        if as_json:
            _echo_measured_json(result.as_dict())
        elif not quiet:
            click.echo(result.format())
        sys.exit(result.exit_code)


# ------------------------------------------------------------------ inspect


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and array table as JSON.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Write a treescope view of the layer, inputs, output and state to FILE "
    "(self-contained; open it in a browser, offline). Rebuilds the record; runs nothing.",
)
@_trust_code_option
@_quiet_option
@_allow_module_option
@_limits_options
@_debug_option
def inspect(
    archive, as_json, debug, html_out=None, quiet=False, allow_modules=(), trust_code=False
):
    """Show what ARCHIVE holds, without rebuilding or running anything.

    Prints the recorded issue, the reporter's note, the layer's structure (type
    names only), every array's shape, dtype, min/max/mean and NaN/Inf counts,
    and the reporter's environment. Imports no jax. --allow-module and
    --trust-code matter only with --html, which rebuilds the record as
    `reprokit run` does (without calling the layer).
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE):
        _check_output_options(as_json, quiet)
        if html_out:
            from reprokit.archive._trust import TrustPolicy

            _write_html(archive, html_out, TrustPolicy(allow_modules, trust_code), as_json, quiet)
            return
        from reprokit.archive._open import open_archive
        from reprokit.views._inspect import archive_statistics, describe_archive
        from reprokit.views._script import replay_script_line, replay_script_status

        # Every member's CRC is checked: the sha256 reads the whole file anyway.
        opened = open_archive(archive, _limits(), verify_members=True)
        try:
            sha256 = opened.reader.sha256()
            statistics = None if quiet else archive_statistics(opened)
            script = replay_script_status(opened)
        finally:
            opened.close()
        if as_json:
            payload = {
                "sha256": sha256,
                "manifest": opened.manifest,
                "arrays": opened.structure["arrays"],
                "statistics": statistics,
                "replay_script": script,
            }
            click.echo(json.dumps(payload, indent=1))
        elif not quiet:
            _echo_text(
                describe_archive(
                    opened.manifest, opened.structure, sha256, statistics, opened.self_check
                )
            )
            if replay_script_line(script):
                click.echo(replay_script_line(script))


def _write_html(archive: str, out: str, trust, as_json: bool, quiet: bool) -> None:
    from reprokit.archive._format import human_bytes
    from reprokit.views._inspect import write_html

    size = write_html(archive, out, trust=trust, limits=_limits())
    if as_json:
        click.echo(json.dumps({"archive": archive, "html": out, "bytes": size}, indent=1))
    elif not quiet:
        click.echo(f"wrote {out} ({human_bytes(size)}): open it in a browser (works offline)")


# ------------------------------------------------------------------ env


@main.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--diff",
    "diff_archive",
    type=click.Path(dir_okay=False),
    metavar="ARCHIVE",
    help="Compare with the environment recorded in ARCHIVE instead.",
)
@_json_option
@_quiet_option
@_limits_options
@_debug_option
def env(diff_archive, as_json, quiet, debug):
    """Print this machine's environment, as an archive packed here would record it.

    With --diff ARCHIVE, print what differs between the reporter's environment
    and this one: versions, platform and device, jax config, JAX_*/XLA_*
    variables, XLA flags; the lines that may change numerical results first.
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE if diff_archive else EXIT_USAGE):
        _check_output_options(as_json, quiet)
        from reprokit.environment._diff import diff_environments, format_environment_table
        from reprokit.environment._snapshot import capture_environment
        from reprokit.views._inspect import describe_environment

        recorded = None
        if diff_archive:
            from reprokit.archive._open import open_archive

            # Read before jax starts: only the manifest is needed.
            opened = open_archive(diff_archive, _limits())
            opened.close()
            recorded = opened.manifest["environment"]
        here = capture_environment()
        if recorded is None:
            if as_json:
                click.echo(json.dumps(here, indent=1, sort_keys=True))
            elif not quiet:
                click.echo(describe_environment(here))
            return
        diffs = diff_environments(recorded, here)
        if as_json:
            rows = [dataclasses.asdict(d) for d in diffs]
            click.echo(json.dumps({"archive": diff_archive, "differences": rows}, indent=1))
        elif not quiet:
            click.echo(f"environment recorded in {diff_archive} vs here:")
            _echo_text(format_environment_table(diffs))


# ------------------------------------------------------------------ issue


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@_json_option
@_quiet_option
@_limits_options
@_debug_option
def issue(archive, as_json, quiet, debug):
    """Print the Markdown to paste into a GitHub issue with ARCHIVE attached.

    The same text `reprokit pack` writes next to the archive (NAME.issue.md):
    the recorded issue in one line, the layer's keypath and type, input shapes,
    the reporter's environment and the replay commands. Warns when the archive
    is over GitHub's 25 MB attachment limit. Reads no arrays; imports no jax.
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE):
        _check_output_options(as_json, quiet)
        from reprokit.views._issue import issue_text

        info = issue_text(archive, limits=_limits())
        if as_json:
            click.echo(json.dumps(info, indent=1))
        elif not quiet:
            _echo_text(info["markdown"], nl=False)
            if info["too_large"]:
                click.echo(
                    "reprokit: warning: the archive is over GitHub's 25 MB attachment limit; "
                    "the text above says what to do",
                    err=True,
                )


# ------------------------------------------------------------------ verify


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_quiet_option
@_allow_module_option
@_limits_options
@_debug_option
def verify(archive, as_json, quiet, allow_modules, debug):
    """Check all of ARCHIVE without importing jax or running anything; print its sha256.

    Checks the zip container, every member's size and CRC-32, the manifest, the
    structure and its array table, and that every class and function it names
    passes reprokit's allow-list (plus --allow-module) by name alone. Exit code
    0: valid; 3: invalid or refused. Cite the sha256 in your issue.
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE):
        _check_output_options(as_json, quiet)
        from reprokit.archive._open import open_archive
        from reprokit.archive._trust import TrustPolicy
        from reprokit.archive._verify import verify_archive
        from reprokit.views._script import replay_script_line, replay_script_status

        trust = TrustPolicy(allow_modules)
        # Opened once: the report and the replay.py check read the same archive.
        opened = open_archive(
            archive, _limits(), allow_modules=trust.modules, verify_members=True
        )
        try:
            report = verify_archive(opened)
            # Rendered in an isolated child: verify's own process loads no template
            # engine (and no jax), while the archive is still read once, here.
            script = replay_script_status(opened, isolated=True)
        finally:
            opened.close()
        if as_json:
            click.echo(json.dumps({**report.as_dict(), "replay_script": script}, indent=1))
        elif not quiet:
            _echo_text(report.format())
            if replay_script_line(script):
                click.echo(replay_script_line(script))


if __name__ == "__main__":  # pragma: no cover
    main()
