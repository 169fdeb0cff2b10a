"""The one way a captured layer is called, at pack time and at replay time.

Numerics depend on how a layer is run: a capture made under `jax.jit`
replays bitwise only under jit, an eager one only eagerly. Packing and
replaying therefore go through this single function, which calls the
isolated layer exactly as penzai's `Layer.stateless_call` documents. Its
source is embedded verbatim into the standalone `replay.py` (it imports
only jax), so the script compiles the very same computation.
"""

from __future__ import annotations

from typing import Any

MODES = ("eager", "jit")


def call_layer(
    submodel: Any, var_values: Any, argument: Any, side_inputs: dict, mode: str
) -> tuple:
    """Runs `submodel.stateless_call` eagerly or under `jax.jit`; returns (output, final vars)."""
    if mode == "jit":
        return _jitted_stateless_call(submodel, tuple(var_values), argument, dict(side_inputs))
    if mode != "eager":
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return submodel.stateless_call(tuple(var_values), argument, **side_inputs)


def _stateless_call(submodel, var_values, argument, side_inputs):
    return submodel.stateless_call(var_values, argument, **side_inputs)


def _jitted_stateless_call(submodel, var_values, argument, side_inputs):
    import jax

    global _jitted
    if _jitted is None:
        _jitted = jax.jit(_stateless_call)
    return _jitted(submodel, var_values, argument, side_inputs)


_jitted = None


def exception_info(error: BaseException) -> dict:
    """The type and message of an exception, as recorded and compared."""
    cls = type(error)
    return {"type": f"{cls.__module__}.{cls.__qualname__}", "message": str(error)}


def outcome_from_call(output: Any, final_var_values: Any, exception: dict | None) -> dict:
    """A call's outcome as `reprokit.portable._verdict` compares it: numpy leaves by path."""
    if exception is not None:
        return {"exception": exception, "output": [], "state": []}
    state = []
    for i, var in enumerate(final_var_values or ()):
        state += _leaves(var.value, f"state[{i}]")
    return {"exception": None, "output": _leaves(output, "output"), "state": state}


def _leaves(tree: Any, prefix: str) -> list:
    import jax

    from reprokit.portable._verdict import leaf_as_numpy  # replay.py: same namespace

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + jax.tree_util.keystr(path), leaf_as_numpy(leaf)) for path, leaf in flat]
