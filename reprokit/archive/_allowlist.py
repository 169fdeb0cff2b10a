"""The loader's allow-list: the only types and callables an archive may name.

An archive is untrusted input, so names in it are never simply imported.
This module decides, from lists held here and never read from the archive,
which classes may be rebuilt and which callables may be referenced:

* classes: pz.Struct subclasses, dataclasses and enums defined in penzai's
  model-building packages, plus modules the maintainer names explicitly
  (`--allow-module`);
* callables: public functions of jax's numeric namespaces (`jax.nn`,
  `jax.numpy`, `jax.lax`, ...) minus anything that touches files or calls
  back into Python, plus functions of the maintainer's named modules.

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

from reprokit._errors import CaptureError, RefusedTypeError

# Packages whose classes may be rebuilt (by module prefix).
TYPE_MODULE_PREFIXES = (
    "penzai.core.",
    "penzai.nn.",
    "penzai.models.",
    "penzai.toolshed.jit_wrapper",
    "penzai.toolshed.isolate_submodel",
)

# Namespaces whose public functions may be referenced (e.g. `Elementwise.fn`).
CALLABLE_NAMESPACES = (
    "jax.nn",
    "jax.numpy",
    "jax.lax",
    "jax.scipy.special",
    "jax.numpy.fft",
    "jax.numpy.linalg",
)

# Functions in those namespaces that read or write files, or call Python
# callbacks: never referenced from an archive, even by a trusted name.
DENIED_CALLABLES = frozenset(
    {
        "jax.numpy:load",
        "jax.numpy:save",
        "jax.numpy:savez",
        "jax.numpy:fromfile",
        "jax.numpy:fromstring",
        "jax.numpy:frombuffer",
        "jax.numpy:fromiter",
        "jax.numpy:fromfunction",
        "jax.numpy:from_dlpack",
        "jax.numpy:frompyfunc",
        "jax.numpy:vectorize",
        "jax.numpy:piecewise",
        "jax.numpy:printoptions",
        "jax.numpy:set_printoptions",
        "jax.lax:map",
        "jax.lax:scan",
        "jax.lax:cond",
        "jax.lax:switch",
        "jax.lax:while_loop",
        "jax.lax:fori_loop",
        "jax.lax:custom_linear_solve",
        "jax.lax:custom_root",
        "jax.lax:associative_scan",
        # These call a function passed as an argument; through functools.partial
        # an archive would choose it (any allowed class or builtin type).
        "jax.numpy:apply_along_axis",
        "jax.numpy:apply_over_axes",
        "jax.numpy:mask_indices",
        "jax.lax:reduce",
        "jax.lax:reduce_window",
        "jax.lax:scatter_apply",
        "jax.lax:composite",
        "jax.lax:platform_dependent",
    }
)

# Modules whose names an archive may never use, not even with --allow-module
# (and `reprokit inspect`, which resolves nothing, still refuses them): the
# standard library (os, subprocess, builtins, importlib, pickle, ...), the
# libraries reprokit trusts only through the lists above, and common packages
# that hold no penzai layers but whose functions install packages, unpickle,
# fetch URLs or run commands. An archive can ask a maintainer to allow a
# module; these are the ones a hurried "sure" must not open. Defense in depth:
# the rule remains that --allow-module is for one's own layer code.
_NEVER_USER_ROOTS = frozenset(sys.stdlib_module_names) | {
    "jax",
    "jaxlib",
    "numpy",
    "ml_dtypes",
    "reprokit",
    "pip",
    "setuptools",
    "pkg_resources",
    "IPython",
    "ipykernel",
    "requests",
    "urllib3",
    "httpx",
    "yaml",
    "dill",
    "cloudpickle",
    "joblib",
    "fsspec",
    "torch",
    "tensorflow",
    "orbax",
    "treescope",
    "msgpack",
    "click",
    "jinja2",
}

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


def is_public_module(name: str) -> bool:
    return all(part.isidentifier() and not part.startswith("_") for part in name.split("."))


@dataclasses.dataclass(frozen=True)
class AllowList:
    """Which names this loader will rebuild; `extra_modules` come from the maintainer."""

    extra_modules: tuple[str, ...] = ()

    def __post_init__(self):
        for module in self.extra_modules:
            if not module or not all(part.isidentifier() for part in module.split(".")):
                raise RefusedTypeError(f"--allow-module {module!r} is not a module name")
            if module.split(".")[0] in _NEVER_USER_ROOTS:
                # Penzai layers never live there, and allowing `os` or `jax`
                # wholesale would admit os.system or jax.pure_callback.
                raise RefusedTypeError(
                    f"--allow-module {module}: reprokit never allows the standard library, "
                    "jax, numpy, reprokit or general-purpose packages such as pip or yaml"
                )

    def _in_extra(self, module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in self.extra_modules)

    def type_module_allowed(self, module: str) -> bool:
        return self._in_extra(module) or (
            is_public_module(module)
            # "penzai.toolshed.jit_wrapper" must not also admit "...jit_wrapper2".
            and any(
                module.startswith(p)
                if p.endswith(".")
                else module == p or module.startswith(p + ".")
                for p in TYPE_MODULE_PREFIXES
            )
        )

    def check_type_name(self, name: str) -> tuple[str, str]:
        """Checks a class name by the rules alone, importing nothing; returns (module, qualname).

        `reprokit verify` runs this on every class an archive names; `resolve_type`
        runs it before importing anything.
        """
        module, qualname = _split(name)
        if not self.type_module_allowed(module):
            raise RefusedTypeError(_refusal(name, "type", module))
        return module, qualname

    def check_callable_name(self, name: str) -> tuple[str, str]:
        """Checks a function name by the rules alone, importing nothing; returns (module, qualname)."""
        module, qualname = _split(name)
        if not _in_callable_namespace(name, module, qualname) and not self._in_extra(module):
            raise RefusedTypeError(_refusal(name, "function", module))
        return module, qualname

    def resolve_type(self, name: str) -> type:
        """The class called `module:qualname`, if this loader allows rebuilding it."""
        module, qualname = self.check_type_name(name)
        obj = _lookup(module, qualname, name)
        if not isinstance(obj, type):
            raise RefusedTypeError(f"archive names {name!r} as a type, but it is not a class")
        if not (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            raise RefusedTypeError(f"archive names {name!r}, which is not a dataclass or enum")
        return obj

    def resolve_callable(self, name: str):
        """The function called `module:qualname`, if this loader allows referencing it."""
        module, qualname = self.check_callable_name(name)
        if module in CALLABLE_NAMESPACES:
            obj = getattr(_import(module, name), qualname, None)
            if obj is None or not isinstance(obj, _jax_callable_types()):
                raise RefusedTypeError(
                    f"archive references {name!r}, which is not a known function"
                )
            return obj
        if self._in_extra(module):
            obj = _lookup(module, qualname, name)
            if not isinstance(obj, _jax_callable_types()):
                raise RefusedTypeError(f"archive references {name!r}, which is not a function")
            return obj
        raise RefusedTypeError(_refusal(name, "function", module))


def _in_callable_namespace(name: str, module: str, qualname: str) -> bool:
    """True for a public function of jax's numeric namespaces; raises for denied or private ones."""
    if name in DENIED_CALLABLES:
        raise RefusedTypeError(f"archive references {name!r}, which reprokit never calls")
    if module not in CALLABLE_NAMESPACES:
        return False
    if "." in qualname or qualname.startswith("_"):
        raise RefusedTypeError(f"archive references {name!r}, which is not a public function")
    return True


def brief(value: object, limit: int = 80) -> str:
    """A short repr of an untrusted value for a one-line message.

    Never recurses: the repr of a list nested a thousand levels deep raises
    RecursionError, which would turn a refusal into a crash.
    """
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int) and abs(value) < 10**30:
        return repr(value)
    return f"a {type(value).__name__}"


def check_name_for_viewing(name: str, kind: str) -> None:
    """Refuses, importing nothing, a name no `--allow-module` should ever admit.

    For `reprokit inspect`, which rebuilds nothing and so lets an archive name
    the maintainer's own modules, yet must still refuse an archive that names
    `os:system`, `builtins:eval`, `numpy:memmap` or a private or denied name.
    `kind` is "type" or "function".
    """
    module, qualname = _split(name)
    if kind == "function":
        if _in_callable_namespace(name, module, qualname):
            return
    elif AllowList().type_module_allowed(module):
        return
    if module.split(".")[0] in _NEVER_USER_ROOTS or not is_public_module(module):
        raise RefusedTypeError(
            f"archive names the {kind} {name!r}, which is not on reprokit's allow-list"
        )


def check_module_for_viewing(module: object) -> None:
    """Refuses a module name no `--allow-module` should admit (see `check_name_for_viewing`).

    The manifest lists the user modules an archive needs, and `inspect`
    suggests `--allow-module` for each: an archive must not be able to make
    that suggestion for `os` or `subprocess`.
    """
    if (
        not isinstance(module, str)
        or not module.isascii()
        or not is_public_module(module)
        or module.split(".")[0] in _NEVER_USER_ROOTS
    ):
        raise RefusedTypeError(
            f"manifest.json lists {brief(module)} as a module to allow; reprokit never "
            "allows that module"
        )


def _split(name: str) -> tuple[str, str]:
    # ASCII only: identifiers that differ only by Unicode normalization could
    # otherwise display as one name and resolve as another.
    if not isinstance(name, str) or name.count(":") != 1 or len(name) > 500 or not name.isascii():
        raise RefusedTypeError(f"archive holds a malformed name {brief(name)}")
    module, qualname = name.split(":")
    parts = qualname.split(".")
    if not all(p.isidentifier() and not p.startswith("__") for p in parts) or not all(
        p.isidentifier() for p in module.split(".")
    ):
        raise RefusedTypeError(f"archive holds a malformed or private name {name!r}")
    return module, qualname


def _refusal(name: str, what: str, module: str) -> str:
    root = module.split(".")[0]
    # Never advise --allow-module for the standard library or reprokit's own
    # dependencies: an archive naming os:system must not get that advice printed.
    if root == "penzai" or root in _NEVER_USER_ROOTS or not is_public_module(module):
        return f"archive names the {what} {name!r}, which is not on reprokit's allow-list"
    return (
        f"archive needs the {what} {name!r} from module {module!r}, which is not allowed; "
        f"inspect the archive, and if you trust that module, rerun with --allow-module {module}"
    )


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
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


def default_modules(name: str) -> bool:
    """Whether a `module:qualname` lives in a package the loader trusts without being told."""
    module = name.split(":")[0]
    return AllowList().type_module_allowed(module) or module in CALLABLE_NAMESPACES
