"""The layer's computation as portable StableHLO, for bugs that live below penzai.

When a replay reproduces, the next question is whether the fault is in
penzai/jax's Python or in XLA. The archive therefore also carries the jitted
call lowered with `jax.export`: a StableHLO module over the flat list of the
record's arrays, which XLA engineers can run without penzai. Its calling
convention (argument and result shapes and dtypes) is kept in the manifest as
JSON, so replay rebuilds the `jax.export.Exported` directly and needs no
extra serialisation dependency.

Running an archive's StableHLO executes a compiled XLA program, never Python:
before it runs, every `custom_call` target in the module is checked against
an allow-list (host callbacks, which could reach Python, are refused).
"""

from __future__ import annotations

import re
from typing import Any

from reprokit._errors import ArchiveError, RefusedTypeError

_MAX_ARGS = 100_000
# custom_call targets that compute on device and cannot reach the host's Python.
_SAFE_CUSTOM_CALL_PREFIXES = (
    "Sharding",
    "SPMDFullToShardShape",
    "SPMDShardToFullShape",
    "annotate_device_placement",
    "lapack_",
    "ducc_",
    "cusolver_",
    "cublas",
    "cu_",
    "hipsolver_",
    "hipblas",
    "mhlo.",
    "stablehlo.",
)
# Every file-based location names a Python file; MLIR bytecode keeps its
# strings as they are, so any path that survives shows up in the bytes.
_PYTHON_FILE = b".py"
_CUSTOM_CALL = re.compile(r"custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*\"([^\"]*)\"")


def _flat(record: dict) -> tuple[list, Any, list[tuple[int, Any]]]:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(
        (
            record["submodel"],
            record["initial_var_values"],
            record["argument"],
            record["side_inputs"],
            # A gradient issue exports the layer's VJP: the cotangent is an input too.
            record.get("output_cotangent"),
        )
    )
    slots = []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            slots.append((index, jax.random.key_impl(leaf) if _is_key(leaf) else None))
    return leaves, treedef, slots


def _is_key(leaf: Any) -> bool:
    import jax
    import numpy as np

    # A key's dtype is jax's extended dtype, never a numpy one: the cheap test
    # first (jax's issubdtype per leaf was a tenth of exporting 10,000 leaves).
    dtype = getattr(leaf, "dtype", None)
    return (
        dtype is not None
        and not isinstance(dtype, np.dtype)
        and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    )


def flat_arguments(record: dict) -> list:
    """The exported function's arguments: every array leaf, PRNG keys as their key data."""
    import jax

    leaves, _, slots = _flat(record)
    return [jax.random.key_data(leaves[i]) if impl is not None else leaves[i] for i, impl in slots]


def export_layer(record: dict) -> tuple[bytes | None, dict]:
    """Lowers the record's call under jit; returns (module bytes, calling convention) or (None, {"error"})."""
    import jax

    leaves, treedef, slots = _flat(record)

    def flat_call(*arrays):
        full = list(leaves)
        for (index, impl), array in zip(slots, arrays, strict=True):
            full[index] = array if impl is None else jax.random.wrap_key_data(array, impl=impl)
        submodel, var_values, argument, side_inputs, cotangent = jax.tree_util.tree_unflatten(
            treedef, full
        )
        if cotangent is None:
            results = submodel.stateless_call(var_values, argument, **side_inputs)
        else:
            from reprokit.portable._gradients import _layer_vjp

            output, final, gradients = _layer_vjp(
                submodel, var_values, argument, side_inputs, list(cotangent)
            )
            results = (output, final, list(gradients))
        out = []
        for leaf in jax.tree_util.tree_leaves(results):
            out.append(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
        return tuple(out)

    try:
        arguments = [
            jax.random.key_data(leaves[i]) if impl is not None else leaves[i]
            for i, impl in slots
        ]
        with _source_files_unnamed():
            exported = jax.export.export(jax.jit(flat_call))(*arguments)
    except Exception as error:  # lowering is best effort: the archive is useful without it
        return None, {"error": " ".join(f"{type(error).__name__}: {error}".split())[:300]}
    try:
        module = exported.mlir_module_serialized
        if _PYTHON_FILE in module:  # a location jax named despite the regex: drop them all
            module = without_locations(exported)
    except Exception as error:  # never ship the reporter's paths instead
        return None, {
            "error": "could not strip source locations from the StableHLO module: "
            + " ".join(f"{type(error).__name__}: {error}".split())[:200]
        }
    names: dict = {}
    meta = {
        "in_avals": [_aval_json(a, names) for a in exported.in_avals],
        "out_avals": [_aval_json(a, names) for a in exported.out_avals],
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "module_kept_var_idx": list(exported.module_kept_var_idx),
        "uses_global_constants": bool(exported.uses_global_constants),
    }
    return module, meta


def _source_files_unnamed():
    """A context in which jax writes every source location with an empty file name.

    jax rewrites the file of each location with
    `jax_hlo_source_file_canonicalization_regex`; set to `.*` for this
    thread and only while exporting (the reporter's config is back as it
    was on exit), it removes the whole path, leaving line, column and
    function names. This replaced printing and re-parsing the module without
    debug information, which cost a small layer's pack as much as the
    lowering itself.
    """
    import contextlib

    try:
        from jax._src import config

        return config.hlo_source_file_canonicalization_regex(".*")
    except Exception:  # a jax without the option: `without_locations` runs instead
        return contextlib.nullcontext()


def without_locations(exported: Any) -> bytes:
    """The exported module as a portable artifact, with every source location dropped.

    `jax.export` records, for each operation, the file, line and function of
    the Python that produced it: absolute paths into the reporter's home
    folder, user name and project (SECURITY.md, class 5). Printing the module
    without debug information and parsing that text again leaves only
    locations into that text (`loc("-":12:5)`); it is then serialized the way
    `jax.export` serializes (same StableHLO compatibility window). The
    fallback for a module in which a file name survived
    `_source_files_unnamed`: three passes over the module, so not the default.
    """
    from jax._src.export import _export
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())
        bare = ir.Module.parse(module.operation.get_asm(enable_debug_info=False))
        return _export._module_to_bytecode(bare)


def _aval_json(aval, names: dict) -> list:
    # numpy computes `dtype.name` anew on each access: once per dtype, not per argument.
    name = names.get(aval.dtype)
    if name is None:
        name = names[aval.dtype] = aval.dtype.name
    return [list(aval.shape), name, bool(aval.weak_type)]


def _parse_in_child(blob: bytes, meta: dict) -> None:
    # MLIR's bytecode reader is native code that a doctored module can crash
    # (seen: segfaults), so the first parse happens in a throwaway process.
    import json
    import os
    import tempfile

    from reprokit._workers import WorkerFailed, run_worker

    with tempfile.TemporaryDirectory() as folder:
        module = os.path.join(folder, "module.mlirbc")
        convention = os.path.join(folder, "convention.json")
        with open(module, "wb") as file:
            file.write(blob)
        with open(convention, "w") as file:
            json.dump(meta, file)
        try:
            result = run_worker("reprokit.record._stablehlo", [module, convention], env=None, timeout=300)
        except WorkerFailed as error:
            raise ArchiveError(f"the archive's StableHLO module failed to parse safely ({error})") from None
    if not result.get("ok"):
        raise ArchiveError(f"the archive's StableHLO module is refused: {result.get('error')}")


def rebuild_exported(blob: bytes, meta: dict, *, check_in_child: bool = True):
    """A `jax.export.Exported` from the archive's module bytes and calling convention.

    The module is first parsed in a child process (`check_in_child`), so a
    module that crashes the parser cannot take this process down.
    """
    import jax

    from reprokit.portable._arrays import dtype_from_name

    try:
        in_avals = tuple(_aval(a, dtype_from_name) for a in meta["in_avals"])
        out_avals = tuple(_aval(a, dtype_from_name) for a in meta["out_avals"])
        if len(in_avals) > _MAX_ARGS or len(out_avals) > _MAX_ARGS:
            raise ValueError("too many arguments")
        platforms = tuple(str(p) for p in meta["platforms"])
        kept = tuple(int(i) for i in meta["module_kept_var_idx"])
        version = int(meta["calling_convention_version"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArchiveError(f"the StableHLO calling convention is malformed ({error})") from None
    n_in, n_out = len(in_avals), len(out_avals)
    exported = jax.export.Exported(
        fun_name="reprokit_layer",
        in_tree=jax.tree_util.tree_structure(((0,) * n_in, {})),
        in_avals=in_avals,
        out_tree=jax.tree_util.tree_structure((0,) * n_out),
        out_avals=out_avals,
        _has_named_shardings=False,
        _in_named_shardings=(None,) * n_in,
        _out_named_shardings=(None,) * n_out,
        in_shardings_hlo=(None,) * n_in,
        out_shardings_hlo=(None,) * n_out,
        nr_devices=1,
        platforms=platforms,
        ordered_effects=(),
        unordered_effects=(),
        disabled_safety_checks=(),
        mlir_module_serialized=bytes(blob),
        calling_convention_version=version,
        module_kept_var_idx=kept,
        uses_global_constants=bool(meta.get("uses_global_constants", False)),
        _get_vjp=None,
    )
    if check_in_child:
        _parse_in_child(blob, meta)
    try:
        text = exported.mlir_module()
    except Exception:
        raise ArchiveError("the archive's StableHLO module does not parse") from None
    for match in _CUSTOM_CALL.finditer(text):
        target = match.group(1) or match.group(2)
        if not target.startswith(_SAFE_CUSTOM_CALL_PREFIXES) or "callback" in target.lower():
            raise RefusedTypeError(f"the StableHLO module calls custom_call {target!r}; refused")
    return exported


def _aval(spec: list, dtype_from_name):
    import jax

    shape, dtype, weak = spec
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError("bad shape")
    return jax.core.ShapedArray(tuple(shape), dtype_from_name(dtype), weak_type=bool(weak))


def call_exported(exported, record: dict) -> tuple[Any, Any]:
    """Runs the StableHLO module on the record's arrays; returns (output, final vars) trees.

    For a gradient record (one with `gradients`) the module is the layer's
    VJP and the result is (output, final vars, gradients as a named dict).
    """
    import jax

    flat = exported.call(*flat_arguments(record))
    template = (record.get("output"), record.get("final_var_values"))
    if "gradients" in record:
        template += (list(record["gradients"].values()),)
    if "output" not in record:
        raise ArchiveError(
            "this archive recorded an exception; it has no StableHLO output to compare"
        )
    structure = jax.tree_util.tree_structure(template)
    if structure.num_leaves != len(flat):
        raise ArchiveError("the StableHLO module's results do not match the recorded output")
    results = jax.tree_util.tree_unflatten(structure, list(flat))
    if "gradients" in record:
        output, final, gradients = results
        return output, final, dict(zip(record["gradients"], gradients, strict=True))
    return results


def _main(argv: list[str]) -> int:
    """Child side of the safe parse: parse and check the module, print {"ok": true}."""
    import json

    module, convention = argv
    with open(module, "rb") as file:
        blob = file.read()
    with open(convention) as file:
        meta = json.load(file)
    try:
        rebuild_exported(blob, meta, check_in_child=False)
    except Exception as error:  # reported by the parent as one line
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}))
        return 1
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
