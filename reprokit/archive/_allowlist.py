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

The rules here import nothing (this is the archive layer: `verify` applies
them to a stranger's archive without loading jax). Resolving a name that
passed them into the live object is `reprokit.record._names`' job.
"""

from __future__ import annotations

import dataclasses
import sys

from reprokit._errors import RefusedTypeError

# Packages whose classes may be rebuilt (by module prefix).
TYPE_MODULE_PREFIXES = (
    "penzai.core.",
    "penzai.nn.",
    "penzai.models.",
    "penzai.toolshed.jit_wrapper",
    "penzai.toolshed.isolate_submodel",
    # penzai's Flax bridge: InterceptedFlaxModuleMethod, InterceptedFlaxScopeData,
    # ArgsAndKwargs, FlaxVarLabel (importing it needs flax: `reprokit[flax]`).
    "penzai.toolshed.unflaxify",
)

# The reviewed Flax section. Flax is trusted by name, never by module:
# `flax.training.checkpoints`, `flax.serialization` and friends read and write
# files, so no prefix of flax is open. These `flax.linen` layer classes are
# rebuilt field by field like any dataclass, without running their
# `__init__`/`__post_init__` (see `reprokit.record._flax`); each holds only
# numbers, dtypes, initializers and the functions below.
FLAX_TYPES = frozenset(
    f"flax.linen.{module}:{name}"
    for module, names in {
        "linear": ("Dense", "DenseGeneral", "Conv", "ConvTranspose", "ConvLocal", "Embed",
                   "Einsum"),
        "normalization": ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm", "InstanceNorm"),
        "stochastic": ("Dropout",),
        "attention": ("MultiHeadDotProductAttention", "MultiHeadAttention", "SelfAttention"),
        "combinators": ("Sequential",),
        "activation": ("PReLU",),
    }.items()
    for name in names
)

# Flax functions a reviewed layer class holds as a field (pure array code).
FLAX_CALLABLES = frozenset(
    {
        "flax.linen.dtypes:promote_dtype",
        "flax.linen.dtypes:canonicalize_dtype",
        "flax.linen.attention:dot_product_attention",
        "flax.linen.attention:dot_product_attention_weights",
    }
)

# Initializer factories of `jax.nn.initializers`: an initializer such as
# `lecun_normal()` is a closure, which has no name; the archive records the
# factory and its arguments instead, and the loader calls the factory again.
# Each of these only builds a closure over its (plain-data) arguments.
INITIALIZER_FACTORIES = frozenset(
    f"jax.nn.initializers:{name}"
    for name in (
        "constant",
        "uniform",
        "normal",
        "truncated_normal",
        "variance_scaling",
        "orthogonal",
        "delta_orthogonal",
    )
)

# Namespaces whose public functions may be referenced (e.g. `Elementwise.fn`).
CALLABLE_NAMESPACES = (
    "jax.nn",
    "jax.nn.initializers",
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
    # Flax layer classes are allowed one by one (FLAX_TYPES): --allow-module
    # flax would open flax.serialization and flax.training.checkpoints.
    "flax",
}

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

    def allows_module(self, module: str) -> bool:
        """Whether the maintainer named `module` (or a package above it) with --allow-module."""
        return any(module == m or module.startswith(m + ".") for m in self.extra_modules)

    def type_allowed(self, name: str, module: str) -> bool:
        return name in FLAX_TYPES or self.type_module_allowed(module)

    def type_module_allowed(self, module: str) -> bool:
        return self.allows_module(module) or (
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
        if not self.type_allowed(name, module):
            raise RefusedTypeError(refusal(name, "type", module))
        return module, qualname

    def check_callable_name(self, name: str) -> tuple[str, str]:
        """Checks a function name by the rules alone, importing nothing; returns (module, qualname)."""
        module, qualname = _split(name)
        if not _in_callable_namespace(name, module, qualname) and not self.allows_module(module):
            raise RefusedTypeError(refusal(name, "function", module))
        return module, qualname


def _in_callable_namespace(name: str, module: str, qualname: str) -> bool:
    """True for a public function of jax's numeric namespaces; raises for denied or private ones."""
    if name in DENIED_CALLABLES:
        raise RefusedTypeError(f"archive references {name!r}, which reprokit never calls")
    if name in FLAX_CALLABLES:
        return True
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
    elif AllowList().type_allowed(name, module):
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


def refusal(name: str, what: str, module: str) -> str:
    """The one-line refusal for a name outside the allow-list, with --allow-module advice where safe."""
    root = module.split(".")[0]
    # Never advise --allow-module for the standard library or reprokit's own
    # dependencies: an archive naming os:system must not get that advice printed.
    if root in ("penzai", "flax") and is_public_module(module):
        # Reviewed libraries: --allow-module cannot help, a newer reprokit may.
        return (
            f"archive names the {what} {name!r}, which is not on reprokit's allow-list of "
            f"reviewed {root} names (SECURITY.md lists them); if it should be, upgrade "
            "reprokit or report it to reprokit's maintainers"
        )
    if root == "penzai" or root in _NEVER_USER_ROOTS or not is_public_module(module):
        return f"archive names the {what} {name!r}, which is not on reprokit's allow-list"
    return (
        f"archive needs the {what} {name!r} from module {module!r}, which is not allowed; "
        f"inspect the archive, and if you trust that module, rerun with --allow-module {module}"
    )


def default_modules(name: str) -> bool:
    """Whether a `module:qualname` lives in a package the loader trusts without being told."""
    module = name.split(":")[0]
    return (
        AllowList().type_allowed(name, module)
        or module in CALLABLE_NAMESPACES
        or name in FLAX_CALLABLES
    )
