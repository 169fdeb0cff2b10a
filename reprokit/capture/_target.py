"""What `reprokit pack TARGET` runs, and the layer a `--select` keypath names.

The CLI packs a model it did not build: TARGET names a function
(`path/to/script.py:make_call` or `package.module:make_call`) that returns
(model, argument[, side_inputs]). Loading and calling it, and turning a
keypath as `pz.pretty_keystr` prints it into a selection (or listing the
keypaths there are), is library logic the command line only calls, so it
lives here and `_cli.py` keeps verbs, options and output.

jax and penzai are imported inside the functions: the target script runs
before reprokit imports jax, as it would on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from reprokit._errors import UsageError


def load_target(target: str) -> Callable[[], Any]:
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


def call_target(fn: Callable[[], Any], target: str) -> tuple[Any, Any, dict]:
    """Calls TARGET's function; returns (model, argument, side_inputs), side_inputs {} if absent."""
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


def select_keypath(model: Any, keypath: str) -> Any:
    """The `pz.Selection` of the subtree whose `pz.pretty_keystr` is `keypath` (`--select`).

    For a model from penzai's unflaxify bridge, `keypath` may also be the
    Flax module path (`Encoder/LayerNorm_0`, as `--list` shows it).
    """
    from penzai import pz

    from reprokit.record._flax import flax_path

    if not isinstance(model, pz.nn.Layer):
        raise UsageError(
            f"the target returned a {type(model).__name__} as model, not a pz.nn.Layer"
        )
    selection = pz.select(model).at_subtrees_where(
        lambda kp, x: pz.pretty_keystr(kp, model) == keypath, with_keypath=True
    )
    if selection.count() == 0:
        selection = pz.select(model).at_subtrees_where(
            lambda kp, x: flax_path(model, kp) == keypath, with_keypath=True
        )
    if selection.count() == 0:
        known = [kp for kp, _ in all_layers(model)]
        known = [kp for kp in known if kp]
        hint = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
        raise UsageError(
            f"no subtree at keypath {keypath!r}; layers include: {hint} (see reprokit pack TARGET --list)"
        )
    return selection


def all_layers(model: Any) -> list[tuple[str, str]]:
    """(keypath, class name) of every `pz.nn.Layer` in `model`, in tree order (`--list`)."""
    from penzai import pz

    out = []
    for keypath, value in _walk_with_keypaths(model):
        if isinstance(value, pz.nn.Layer):
            out.append((pz.pretty_keystr(keypath, model), type(value).__name__))
    return out


def flax_paths(model: Any) -> dict[str, str]:
    """keypath -> Flax module path (`Encoder/LayerNorm_0`) of every layer from penzai's unflaxify."""
    from penzai import pz

    from reprokit.record._flax import flax_path

    out = {}
    for keypath, value in _walk_with_keypaths(model):
        if isinstance(value, pz.nn.Layer):
            path = flax_path(model, keypath)
            if path:
                out[pz.pretty_keystr(keypath, model)] = path
    return out


def _walk_with_keypaths(model: Any) -> Iterator[tuple[tuple, Any]]:
    # Depth-first, parents before children: the order `--list` prints.
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
