"""Names for classes and functions: taken at pack time, resolved at load time.

The archive layer's allow-list (`reprokit.archive._allowlist`) decides by
rules alone, importing nothing, which names an archive may use. Turning a
live object into such a name, and a name back into the object, needs
imports (jax's namespaces, the maintainer's allowed modules): that half
lives here, beside the encoder and decoder that use it.

A name is resolved by importing only an allowed module, then taking one
attribute path inside it, and the object found must declare itself to live
exactly at that name (`__module__`/`__qualname__`): attribute walks such as
`numpy.os.system` or `relu.__globals__` therefore fail.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import sys
import types
from collections.abc import Iterable

from reprokit._errors import CaptureError, RefusedTypeError, ReplayError
from reprokit.archive._allowlist import (
    CALLABLE_NAMESPACES,
    DENIED_CALLABLES,
    FLAX_CALLABLES,
    AllowList,
    default_modules,
    refusal,
)

_CALLABLE_TYPES: tuple[type, ...] = (
    types.FunctionType,
    types.BuiltinFunctionType,
)


def _jax_callable_types() -> tuple[type, ...]:
    import jax
    import numpy as np

    return (
        _CALLABLE_TYPES
        + (
            type(jax.nn.relu),  # custom_jvp
            type(jax.nn.silu),  # jitted function
            np.ufunc,
        )
        + tuple({type(jax.numpy.sin), type(jax.numpy.negative), type(jax.custom_vjp(lambda x: x))})
    )



def resolve_type(allow: AllowList, name: str) -> type:
    """The class called `module:qualname`, if this loader allows rebuilding it."""
    module, qualname = allow.check_type_name(name)
    obj = _lookup(module, qualname, name)
    if not isinstance(obj, type):
        raise RefusedTypeError(f"archive names {name!r} as a type, but it is not a class")
    if not (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
        raise RefusedTypeError(f"archive names {name!r}, which is not a dataclass or enum")
    return obj

def resolve_callable(allow: AllowList, name: str):
    """The function called `module:qualname`, if this loader allows referencing it."""
    module, qualname = allow.check_callable_name(name)
    if module in CALLABLE_NAMESPACES:
        obj = getattr(_import(module, name), qualname, None)
        if obj is None or not isinstance(obj, _jax_callable_types()):
            raise RefusedTypeError(
                f"archive references {name!r}, which is not a known function"
            )
        return obj
    if allow.allows_module(module) or name in FLAX_CALLABLES:
        obj = _lookup(module, qualname, name)
        if not isinstance(obj, _jax_callable_types()):
            raise RefusedTypeError(f"archive references {name!r}, which is not a function")
        return obj
    raise RefusedTypeError(refusal(name, "function", module))



def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if getattr(error, "name", None) == "flax" or module.split(".")[0] == "flax":
            from reprokit.record._flax import needs_flax_error

            raise needs_flax_error(None) from None
        if isinstance(error, ModuleNotFoundError):
            # The maintainer allowed the module, this machine lacks it: the archive
            # is valid, it cannot be replayed here (exit 5, not "invalid").
            missing = getattr(error, "name", None) or module
            raise ReplayError(
                f"cannot replay here: module {missing!r} (needed for {name!r}) is not installed; "
                f"install it or put it on PYTHONPATH, or ask the reporter to repack with "
                "--bundle-code"
            ) from None
        raise RefusedTypeError(
            f"cannot import module {module!r} needed for {name!r}: {error}"
        ) from None


def _lookup(module: str, qualname: str, name: str):
    obj = _import(module, name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise RefusedTypeError(f"module {module!r} has no {qualname!r}")
    if getattr(obj, "__module__", None) != module or getattr(obj, "__qualname__", None) != qualname:
        raise RefusedTypeError(f"{name!r} is an alias of another object; refused")
    return obj


# ---------------------------------------------------------------- naming (pack side)

_callable_names: dict[int, str] | None = None


def _callable_name_table() -> dict[int, str]:
    global _callable_names
    if _callable_names is None:
        table: dict[int, str] = {}
        kinds = _jax_callable_types()
        for namespace in CALLABLE_NAMESPACES:
            module = importlib.import_module(namespace)
            for attr, value in vars(module).items():
                name = f"{namespace}:{attr}"
                if attr.startswith("_") or name in DENIED_CALLABLES or not isinstance(value, kinds):
                    continue
                table.setdefault(id(value), name)
        _callable_names = table
    return _callable_names


def name_of_type(cls: type, where: str, aliases: dict[str, str] | None = None) -> str:
    """The `module:qualname` under which a class can be rebuilt, or a CaptureError saying why not.

    `aliases` renames modules: with `--bundle-code`, a script's `__main__`
    becomes the module its extracted source is bundled as.
    """
    module, qualname = cls.__module__, cls.__qualname__
    module = (aliases or {}).get(module, module)
    _refuse_local(module, qualname, f"class {qualname}", where)
    return f"{module}:{qualname}"


def name_of_callable(
    fn, where: str, extra_modules: Iterable[str] = (), aliases: dict[str, str] | None = None
) -> str:
    """The name under which a callable can be referenced, or a CaptureError saying why not."""
    known = _callable_name_table().get(id(fn))
    if known is not None:
        return known
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    _refuse_local((aliases or {}).get(module, module), qualname, f"function {qualname}", where)
    if not isinstance(fn, _jax_callable_types()):
        raise CaptureError(
            f"{where} holds {fn!r}, which reprokit cannot save; use a plain function defined at "
            "module level (or functools.partial of one)"
        )
    owner = sys.modules.get(module)
    if owner is None or _get_path(owner, qualname) is not fn:
        raise CaptureError(
            f"{where} holds {module}.{qualname}, which cannot be found again by that name; "
            "define it at module level under its own name"
        )
    return f"{(aliases or {}).get(module, module)}:{qualname}"


def outside_defaults(names: Iterable[str]) -> dict[str, set[str]]:
    """module -> qualnames, for the `module:qualname` names outside reprokit's default modules.

    What a record needs beyond the allow-list: the manifest's `modules` (the
    keys) and the sources a bundle must provide (`--bundle-code`).
    """
    found: dict[str, set[str]] = {}
    for name in names:
        if ":" in name and not default_modules(name):
            module, qualname = name.split(":", 1)
            found.setdefault(module, set()).add(qualname)
    return found


def _get_path(obj, qualname: str):
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _refuse_local(module: str, qualname: str, what: str, where: str) -> None:
    if "<lambda>" in qualname:
        raise CaptureError(
            f"{where} holds a lambda, which cannot be rebuilt safely; replace it with a function "
            "defined at module level in an importable module"
        )
    if "<locals>" in qualname:
        raise CaptureError(
            f"{where} holds {what}, defined inside another function (a closure); define it at "
            "module level in an importable module"
        )
    if module == "__main__" or module.startswith("__reprokit_target"):
        raise CaptureError(
            f"{where} holds {what}, defined in the script being run (__main__), which a "
            "maintainer cannot import; pack with --bundle-code (bundle_code=True) to ship its "
            "source, or move it into an importable module and pass --allow-module MODULE when replaying"
        )


