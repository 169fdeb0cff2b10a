"""The one way a captured layer's backward pass is run, at pack time and at replay time.

A gradient bug (finite forward pass, NaN from `jax.grad`) lives in a
layer's VJP, not in its output. To replay it alone, the layer's stateless
call is differentiated with `jax.vjp` with respect to its parameters and the
inexact leaves of its argument, and the cotangent that reached the layer's
output during the reporter's real backward pass is pulled back through it.
Like `_calling`, this module is embedded verbatim into `replay.py` (it
imports only jax and penzai), so the script computes the very same
gradients `reprokit run` does, in the recorded mode.

Gradients are named leaf by leaf: `argument<path>` and
`parameters['<label>']<path>`, in a flat dict, so a verdict can say which
one went non-finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _differentiable(submodel: Any, argument: Any) -> tuple:
    """(names, leaves, rebuild) of what is differentiated: inexact argument and parameter leaves.

    `rebuild(new_leaves)` returns (submodel, argument) with those leaves replaced.
    """
    import jax
    import jax.numpy as jnp
    from penzai import pz

    selection = pz.select(submodel).at_instances_of(pz.ParameterValue)
    params = list(selection.get_sequence())
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        {"argument": argument, "parameters": [p.value for p in params]}
    )
    names, positions, leaves = [], [], []
    for position, (path, leaf) in enumerate(flat):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue
        head, rest = path[0].key, path[1:]
        if head == "parameters":
            index, rest = rest[0].idx, rest[1:]
            name = f"parameters[{str(params[index].label)!r}]" + jax.tree_util.keystr(rest)
        else:
            name = "argument" + jax.tree_util.keystr(rest)
        names.append(name)
        positions.append(position)
        leaves.append(leaf)
    all_leaves = [leaf for _, leaf in flat]

    def rebuild(new_leaves):
        replaced = list(all_leaves)
        for position, leaf in zip(positions, new_leaves, strict=True):
            replaced[position] = leaf
        tree = treedef.unflatten(replaced)
        values = iter(tree["parameters"])
        new_params = [dataclasses.replace(param, value=next(values)) for param in params]
        return selection.set_sequence(new_params), tree["argument"]

    return names, leaves, rebuild


def gradient_names(submodel: Any, argument: Any) -> list:
    """The names `call_layer_vjp` gives the gradients of this layer and argument."""
    return _differentiable(submodel, argument)[0]


def _full_cotangent(output: Any, cotangent: list) -> Any:
    """The cotangent tree for `output`: the recorded arrays for its inexact leaves, float0 zeros else."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves, treedef = jax.tree_util.tree_flatten(output)
    wanted = sum(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves)
    if wanted != len(cotangent):
        raise ValueError(
            f"the recorded cotangent has {len(cotangent)} arrays; the layer's output has "
            f"{wanted} inexact leaves"
        )
    given = iter(cotangent)
    full = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            full.append(jnp.asarray(next(given), dtype=leaf.dtype).reshape(leaf.shape))
        else:
            full.append(np.zeros(leaf.shape, dtype=jax.dtypes.float0))
    return treedef.unflatten(full)


def _layer_vjp(submodel, var_values, argument, side_inputs, cotangent):
    import jax

    _, leaves, rebuild = _differentiable(submodel, argument)

    def forward(diff_leaves):
        layer, arg = rebuild(diff_leaves)
        output, final = layer.stateless_call(var_values, arg, **side_inputs)
        return output, final

    output, pull_back, final = jax.vjp(forward, leaves, has_aux=True)
    (gradients,) = pull_back(_full_cotangent(output, cotangent))
    return output, final, gradients


def call_layer_vjp(
    submodel: Any, var_values: Any, argument: Any, side_inputs: dict, mode: str, cotangent: list
) -> tuple:
    """Runs the layer forward and pulls `cotangent` back through it, eagerly or under `jax.jit`.

    `cotangent` holds one array per inexact leaf of the layer's output (in
    `jax.tree_util.tree_leaves` order). Returns (output, final vars,
    gradients), gradients a dict from `gradient_names` to arrays.
    """
    names = gradient_names(submodel, argument)
    args = (submodel, tuple(var_values), argument, dict(side_inputs), list(cotangent))
    if mode == "jit":
        global _jitted_vjp
        if _jitted_vjp is None:
            import jax

            _jitted_vjp = jax.jit(_layer_vjp)
        output, final, gradients = _jitted_vjp(*args)
    elif mode == "eager":
        output, final, gradients = _layer_vjp(*args)
    else:
        raise ValueError(f"mode must be 'eager' or 'jit', not {mode!r}")
    return output, final, dict(zip(names, gradients, strict=True))


_jitted_vjp = None


def gradient_outcome(outcome: dict, gradients: Any) -> dict:
    """`outcome` with its gradients added as (name, numpy array) pairs, as the verdict compares them."""
    from reprokit.portable._verdict import leaf_as_numpy  # replay.py: same namespace

    if not isinstance(gradients, dict):
        return {**outcome, "gradients": []}
    return {
        **outcome,
        "gradients": [(str(name), leaf_as_numpy(value)) for name, value in gradients.items()],
    }
