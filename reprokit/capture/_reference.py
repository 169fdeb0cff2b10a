"""The float64 reference of `find(check="mismatch")`: the model promoted, run once more.

A "mismatch" culprit is a layer whose output drifts from a trusted run
while its inputs did not. The default trusted run is the same model in
float64: parameters, inputs, state and the float dtypes layers hold in
static fields (e.g. `CastToDType`) promoted, under `jax_enable_x64` and
matmul precision "highest". This module builds that copy (the reporter's
model is never touched) and records each call's float inputs and outputs
with the same probes as the main pass, so the two passes line up call by
call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from reprokit._errors import CaptureError, UsageError
from reprokit.capture._probe import _is_inexact, _layer_names, _run, _Session

REFERENCES = ("float64", "eager", "jit")


def _float64_like(value: Any) -> Any:
    """float64 in the same kind of object as a static dtype field, or None if not a float dtype."""
    try:
        if not isinstance(value, np.dtype | type):
            return None
        dtype = np.dtype(value)
    except TypeError:
        return None
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    if isinstance(value, np.dtype):
        return np.dtype(np.complex128 if complex_ else np.float64)
    if value.__module__.startswith("jax"):
        return jnp.complex128 if complex_ else jnp.float64
    return np.complex128 if complex_ else np.float64


def _promote_static_dtypes(tree: Any) -> Any:
    """Replaces float dtypes held in layers' static fields (e.g. CastToDType) by float64."""

    def go(node):
        node = pz.select(node).at_children().apply(go)
        if isinstance(node, pz.Struct):
            changes = {}
            for field in dataclasses.fields(node):
                if not field.metadata.get("pytree_node", True):
                    promoted = _float64_like(getattr(node, field.name))
                    if promoted is not None:
                        changes[field.name] = promoted
            if changes:
                fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
                node = type(node).from_attributes(**{**fields, **changes})
        return node

    return go(tree)


def _cast_float64(tree: Any) -> Any:
    def cast(leaf):
        if isinstance(leaf, jax.Array | np.ndarray | float | complex) and _is_inexact(
            jnp.asarray(leaf)
        ):
            return jnp.asarray(leaf, jnp.complex128 if jnp.iscomplexobj(leaf) else jnp.float64)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def _promoted(tree: Any) -> Any:
    """A float64 copy of (model, argument, side inputs) with fresh variables (call under x64)."""
    slots, values = pz.unbind_variables(tree, freeze=True)
    fresh = [
        type(value)(value=_cast_float64(value.value), label=value.label, metadata=value.metadata)
        for value in values
    ]
    slots = _promote_static_dtypes(_cast_float64(slots))
    return pz.bind_variables(slots, fresh, unfreeze_as_copy=True)


def _reference_values(
    model: Any, argument: Any, side_inputs: dict, reference: Any, mode: str | None
) -> tuple[dict, str, list]:
    """Runs the reference pass; returns each call's float inputs and outputs, its name, its layers."""
    session = _Session("mismatch", keep_values=True)
    if reference is None or reference == "float64":
        name = "float64 (jax_enable_x64, float64 parameters, matmul precision highest)"
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            ref_model, ref_arg, ref_sides = _promoted((model, argument, side_inputs))
            error = _run(ref_model, ref_arg, ref_sides, session, mode)
    elif reference in ("eager", "jit"):
        name = f"the same model run {'eagerly' if reference == 'eager' else 'under jax.jit'}"
        error = _run(model, argument, side_inputs, session, reference)
    elif isinstance(reference, pz.nn.Layer):
        name = f"the reference model ({type(reference).__name__})"
        error = _run(reference, argument, side_inputs, session, mode)
    else:
        raise UsageError(
            f"reference must be one of {', '.join(REFERENCES)} or a pz.nn.Layer, not {reference!r}"
        )
    if error is not None:
        raise CaptureError(
            f"the reference pass raised {type(error).__name__}: {error}; pass reference='eager', "
            "'jit' or a model to compare with"
        )
    stored, names = session.stored, _layer_names(session.sites)
    session.release()
    return stored, name, names
