"""The `reprokit` command line: pack, run, inspect.

Verbs are click subcommands. Every failure a user can cause ends as one
line on stderr and a documented exit code; `--debug` shows the traceback.
`run` reads the manifest before jax is imported, so recorded XLA flags can
still be put in force.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
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

EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_REPRODUCED}  reproduced (run) / success
  {EXIT_NOT_REPRODUCED}  not reproduced (run)
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
        click.echo(f"reprokit: error: {error}", err=True)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, SystemExit, click.exceptions.Exit):
        raise
    except Exception as error:
        if debug:
            traceback.print_exc()
        message = " ".join(f"{type(error).__name__}: {error}".split())[:500]
        click.echo(f"reprokit: error: {message} (rerun with --debug for the traceback)", err=True)
        sys.exit(unexpected_exit)


def _debug_option(fn):
    return click.option("--debug", is_flag=True, help="Show tracebacks of errors.")(fn)


def _allow_module_option(fn):
    return click.option(
        "--allow-module",
        "allow_modules",
        multiple=True,
        metavar="MODULE",
        help="Also rebuild classes and functions from MODULE (your own code; repeatable). "
        "Only for modules you trust: they are imported.",
    )(fn)


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reprokit", message="reprokit %(version)s")
def main() -> None:
    """Pack a failing JAX/penzai layer into one .repro.zip that anyone can replay.

    \b
    Reporter:    reprokit pack script.py:make_call --list
                 reprokit pack script.py:make_call --select 'MLP.sublayers[2]' -o bug.repro.zip
    Maintainer:  reprokit inspect bug.repro.zip && reprokit run bug.repro.zip
    """


# ------------------------------------------------------------------ pack


def _load_target(target: str):
    """Imports `path/to/script.py:function` or `package.module:function` and returns the function."""
    spec, _, name = target.rpartition(":")
    if not spec or not name.isidentifier():
        raise UsageError(
            f"TARGET {target!r} must look like path/to/script.py:make_call or module:make_call"
        )
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise UsageError(f"no such script: {spec}")
        module_spec = importlib.util.spec_from_file_location("__reprokit_target__", spec)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(spec)))
        sys.modules["__reprokit_target__"] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(spec)
        except ImportError as error:
            raise UsageError(f"cannot import {spec!r}: {error}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{spec} has no function {name!r}")
    return fn


def _call_target(fn, target: str):
    result = fn()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise UsageError(
            f"{target} must return (model, argument) or (model, argument, side_inputs), "
            f"got {type(result).__name__}"
        )
    model, argument = result[:2]
    side_inputs = result[2] if len(result) == 3 else {}
    if not isinstance(side_inputs, dict):
        raise UsageError(f"{target}: side_inputs must be a dict, got {type(side_inputs).__name__}")
    return model, argument, side_inputs


def _select(model, keypath: str):
    from penzai import pz

    if not isinstance(model, pz.nn.Layer):
        raise UsageError(
            f"the target returned a {type(model).__name__} as model, not a pz.nn.Layer"
        )
    selection = pz.select(model).at_subtrees_where(
        lambda kp, x: pz.pretty_keystr(kp, model) == keypath, with_keypath=True
    )
    if selection.count() == 0:
        known = [kp for kp, _ in _all_layers(model)]
        known = [kp for kp in known if kp]
        hint = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
        raise UsageError(
            f"no subtree at keypath {keypath!r}; layers include: {hint} (see reprokit pack TARGET --list)"
        )
    return selection


def _all_layers(model):
    from penzai import pz

    out = []
    for keypath, value in _walk_with_keypaths(model):
        if isinstance(value, pz.nn.Layer):
            out.append((pz.pretty_keystr(keypath, model), type(value).__name__))
    return out


def _walk_with_keypaths(model):
    import jax
    from penzai import pz

    stack = [((), model)]
    while stack:
        keypath, value = stack.pop(0)
        yield keypath, value
        if isinstance(value, (pz.Struct, list, tuple, dict)):
            children, _ = jax.tree_util.tree_flatten_with_path(
                value, is_leaf=lambda x, parent=value: x is not parent
            )
            stack[0:0] = [(keypath + path, child) for path, child in children]


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("target")
@click.option(
    "--select",
    "keypath",
    metavar="KEYPATH",
    help="The layer to pack, as pz.pretty_keystr prints it, e.g. 'MLP.sublayers[2]/Affine.sublayers[0]' (see --list).",
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
    "--list",
    "list_layers",
    is_flag=True,
    help="List the model's layers with their keypaths and exit.",
)
@_allow_module_option
@_debug_option
def pack(target, keypath, out, call, signature, mode, note, list_layers, allow_modules, debug):
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
        fn = _load_target(target)
        model, argument, side_inputs = _call_target(fn, target)
        if list_layers:
            for path, kind in _all_layers(model):
                click.echo(f"{kind:32} {path or '(root)'}")
            return
        if not keypath:
            raise UsageError("choose the layer with --select KEYPATH (list them with --list)")
        from reprokit._pack import pack as pack_fn

        selection = _select(model, keypath)
        out = out or f"{type(selection.get()).__name__.lower()}.repro.zip"
        result = pack_fn(
            selection,
            argument,
            side_inputs=side_inputs,
            out=out,
            note=note,
            call=call,
            signature=signature,
            mode=mode,
            allow_modules=allow_modules,
        )
        click.echo(result.summary())


# ------------------------------------------------------------------ run


def _put_recorded_xla_flags(path: str) -> list[str]:
    """Sets the archive's XLA flags before jax starts; returns notes on flags left out."""
    if "jax" in sys.modules:
        return []
    from reprokit._replay import open_archive

    opened = open_archive(path)
    try:
        flags = opened.manifest["environment"].get("xla_flags") or []
    finally:
        opened.close()
    flags = [f for f in flags if isinstance(f, str)]
    current = os.environ.get("XLA_FLAGS", "").split()
    if not flags or flags == current:
        return []
    from reprokit._environment import check_xla_flags, replayable_xla_flags

    flags, machine_specific = replayable_xla_flags(flags)
    accepted, rejected = check_xla_flags(flags)
    os.environ["XLA_FLAGS"] = " ".join(accepted)
    notes = [
        f"recorded XLA flag {flag} names the reporter's machine; left out"
        for flag in machine_specific
    ]
    return notes + [
        f"recorded XLA flag {flag} is unknown to this jaxlib; left out" for flag in rejected
    ]


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@_allow_module_option
@_debug_option
def run(archive, as_json, allow_modules, debug):
    """Replay ARCHIVE and say whether the recorded issue reproduces here.

    Checks every member, restores the recorded jax configuration and XLA flags,
    rebuilds the layer from reprokit's allow-list (never unpickling or running
    code from the archive), calls it in the recorded mode (eager or jit), and
    compares the outcome with the recorded one: bitwise, or max abs/rel error per
    output leaf.
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE):
        notes = _put_recorded_xla_flags(archive)
        from reprokit._replay import replay

        verdict = replay(archive, allow_modules=allow_modules)
        if notes:
            verdict = _with_notes(verdict, notes)
        if as_json:
            click.echo(json.dumps(verdict.as_dict(), indent=1, default=str))
        else:
            click.echo(verdict.format())
        sys.exit(EXIT_REPRODUCED if verdict.reproduced else EXIT_NOT_REPRODUCED)


def _with_notes(verdict, notes):
    import dataclasses

    return dataclasses.replace(verdict, notes=tuple(notes) + verdict.notes)


# ------------------------------------------------------------------ inspect


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and array table as JSON.")
@_debug_option
def inspect(archive, as_json, debug):
    """Show what ARCHIVE holds, without rebuilding or running anything.

    Prints the recorded issue, the reporter's note, the layer's structure (type
    names only), array shapes and dtypes, and the reporter's environment.
    """
    with _reported_errors(debug, EXIT_INVALID_ARCHIVE):
        from reprokit._inspect import describe_archive
        from reprokit._replay import open_archive

        opened = open_archive(archive)
        try:
            sha256 = opened.reader.sha256()
        finally:
            opened.close()
        if as_json:
            payload = {
                "sha256": sha256,
                "manifest": opened.manifest,
                "arrays": opened.structure["arrays"],
            }
            click.echo(json.dumps(payload, indent=1))
        else:
            click.echo(describe_archive(opened.manifest, opened.structure, sha256))


if __name__ == "__main__":  # pragma: no cover
    main()
