"""What penzai's Flax bridge needs from the encoder and decoder, and nothing more.

`penzai.toolshed.unflaxify` turns a `flax.linen` model into penzai layers that
hold the Flax module objects themselves. Two kinds of value in them have no
plain encoding:

* initializers such as `nn.Dense.kernel_init` (`lecun_normal()`): closures
  made by a `jax.nn.initializers` factory, which have no importable name. The
  archive records the factory and the arguments the closure captured, and the
  loader calls that factory (a reviewed one only) again.
* Flax modules: dataclasses whose `__post_init__` attaches them to a parent
  and a scope. The loader sets the fields and then only the two bookkeeping
  attributes an unbound, parentless module has (`_id`, `_state`), exactly
  what Flax's own `__post_init__` does for `parent=None`, without running it.

flax is optional (`pip install 'reprokit[flax]'`): nothing here imports it
unless the value at hand already is a Flax object.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import types
from typing import Any

from reprokit._errors import ArchiveError, CaptureError, RefusedTypeError, ReplayError
from reprokit.archive._allowlist import INITIALIZER_FACTORIES

_FACTORY_MODULE = "jax.nn.initializers"


def initializer_call(fn: Any) -> tuple[str, dict[str, Any]] | None:
    """(factory name, keyword arguments) that remake `fn`, if it is a reviewed initializer closure.

    None for anything else (the caller then names the function as usual).
    """
    if not isinstance(fn, types.FunctionType) or not fn.__qualname__.endswith(".<locals>.init"):
        return None
    factory_name = fn.__qualname__.removesuffix(".<locals>.init")
    name = f"{_FACTORY_MODULE}:{factory_name}"
    if name not in INITIALIZER_FACTORIES:
        return None
    initializers = sys.modules.get(_FACTORY_MODULE)
    factory = getattr(initializers, factory_name, None)
    # The closure's code must be the one compiled inside that very factory.
    if not isinstance(factory, types.FunctionType) or fn.__code__ not in factory.__code__.co_consts:
        return None
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = {}
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        if var not in params:
            return None
        kwargs[var] = cell.cell_contents
    # `dtype` is captured as the default of the closure's own `dtype` argument.
    for arg, default in (fn.__kwdefaults__ or {}).items():
        if arg in params:
            kwargs[arg] = default
    own = inspect.signature(fn).parameters
    if "dtype" in own and "dtype" in params and own["dtype"].default is not inspect.Parameter.empty:
        kwargs["dtype"] = own["dtype"].default
    # Check the round trip now rather than at replay: the factory must give
    # back a closure of the same code over the same values.
    if not _same_closure(factory(**kwargs), fn):
        return None
    return name, dict(sorted(kwargs.items()))


def _same_closure(a: Any, b: Any) -> bool:
    if a.__code__ is not b.__code__ or a.__defaults__ != b.__defaults__:
        return False
    for x, y in zip(a.__closure__ or (), b.__closure__ or (), strict=True):
        x, y = x.cell_contents, y.cell_contents
        try:
            if not (x is y or (type(x) is type(y) and bool(x == y))):
                return False
        except Exception:  # arrays compare elementwise; fall back to bytes
            import numpy as np

            if np.asarray(x).tobytes() != np.asarray(y).tobytes():
                return False
    return True


def make_initializer(name: str, kwargs: dict[str, Any]) -> Any:
    """Calls the reviewed initializer factory `name` with `kwargs` from an archive."""
    if name not in INITIALIZER_FACTORIES:
        raise RefusedTypeError(
            f"archive names the initializer factory {name[:80]!r}, which is not on reprokit's "
            "allow-list"
        )
    import jax.nn.initializers

    factory = getattr(jax.nn.initializers, name.split(":")[1])
    params = inspect.signature(factory).parameters
    if not all(key in params for key in kwargs):
        raise ArchiveError(f"archive calls {name!r} with arguments it does not take")
    try:
        return factory(**kwargs)
    except Exception as error:  # the factory refusing archive-chosen values is a bad archive
        # Only the exception's type: its message may quote the archive's values.
        raise ArchiveError(
            f"archive calls {name!r} with bad arguments ({type(error).__name__})"
        ) from None


def is_flax_module_class(cls: type) -> bool:
    """Whether `cls` is a `flax.linen.Module` subclass (False, importing nothing, without flax)."""
    linen = sys.modules.get("flax.linen.module")
    return linen is not None and isinstance(cls, type) and issubclass(cls, linen.Module)


def rebuild_module(cls: type, values: dict[str, Any]) -> Any:
    """A parentless, unbound Flax module with these field values; its `__post_init__` never runs."""
    from flax.ids import uuid
    from flax.linen.module import Module, _ModuleInternalState

    if values.get("parent") is not None:
        raise ArchiveError(f"archive holds a {cls.__qualname__} with a parent; reprokit expects none")
    for name, value in values.items():
        if isinstance(value, Module) and value.parent is not None:
            raise ArchiveError(f"archive holds a {cls.__qualname__} whose {name} has a parent")
    instance = object.__new__(cls)
    for name, value in values.items():
        # `parent` is a descriptor that stores `_parent_ref`; setting it is
        # what Flax does itself.
        object.__setattr__(instance, name, value)
    object.__setattr__(instance, "_id", uuid())
    object.__setattr__(instance, "_state", _ModuleInternalState())
    return instance


def flax_version() -> str | None:
    """The installed flax version, or None without flax (never imports flax itself)."""
    from importlib import metadata

    try:
        return metadata.version("flax")
    except metadata.PackageNotFoundError:
        return None


def needs_flax_error(version: Any) -> ReplayError:
    """The error for an archive that needs flax on a machine without it.

    `version` comes from the archive's manifest: printed only if it looks like one.
    """
    if not (isinstance(version, str) and re.fullmatch(r"[0-9A-Za-z.+!-]{1,40}", version)):
        version = None
    wanted = f"flax {version}" if version else "flax"
    return ReplayError(
        f"this archive needs {wanted}, which is not installed here: "
        "pip install 'reprokit[flax]'"
    )


def names_need_flax(names: Any) -> bool:
    """Whether any `module:qualname` in `names` needs flax importable."""
    return any(
        isinstance(name, str)
        and (name.startswith("flax.") or name.startswith("penzai.toolshed.unflaxify:"))
        for name in names
    )


def require_flax(structure: dict, manifest: dict) -> None:
    """Raises ReplayError (exit 5) before decoding if the archive needs flax and it is missing."""
    from reprokit.archive._grammar import named

    try:
        if importlib.util.find_spec("flax") is not None:
            return
    except ImportError:
        pass
    if any(names_need_flax(named(part)) for part in structure["record"].values()):
        packages = manifest.get("environment", {}).get("packages", {})
        raise needs_flax_error(packages.get("flax") if isinstance(packages, dict) else None)


def check_capture(value: Any, where: str) -> None:
    """Refuses, at pack time, a Flax module attached to a parent (only parentless ones rebuild).

    A module's scope is not a dataclass field and is not recorded: like
    `Module.clone()`, the archive holds the unbound module, which Flax binds
    again when the layer runs.
    """
    if getattr(value, "parent", None) is not None:
        raise CaptureError(
            f"{where} is a Flax module attached to a parent module; pack the layers "
            "penzai.toolshed.unflaxify.unflaxify_apply returns (their modules are unbound clones)"
        )


def flax_path(model: Any, keys: tuple) -> str | None:
    """The Flax module path (`Encoder/LayerNorm_0`) of the layer at jax keypath `keys` in `model`.

    None unless that layer is one of penzai's `InterceptedFlaxModuleMethod`s.
    Each intercepted call along the way contributes its module's name (the
    root module, which has none, its class name), as Flax names modules.
    """
    unflaxify = sys.modules.get("penzai.toolshed.unflaxify")
    if unflaxify is None:
        return None
    intercepted = unflaxify.InterceptedFlaxModuleMethod
    parts: list[str] = []
    node = model
    for key in (None, *keys):
        if key is not None:
            node = _step(node, key)
            if node is _MISSING:
                return None
        if isinstance(node, intercepted):
            module = node.module
            part = getattr(module, "name", None) or type(module).__name__
            if node.method_name != "__call__":
                part += f".{node.method_name}"
            parts.append(part)
    if not isinstance(node, intercepted):
        return None
    from reprokit.archive._format import FLAX_PATH

    path = "/".join(parts)
    # A module named with spaces or quotes is shown by its keypath alone.
    return path if FLAX_PATH.fullmatch(path) else None


_MISSING = object()


def _step(node: Any, key: Any) -> Any:
    if hasattr(key, "name"):  # GetAttrKey
        return getattr(node, key.name, _MISSING)
    index = getattr(key, "key", getattr(key, "idx", _MISSING))
    try:
        return node[index]
    except (KeyError, IndexError, TypeError):
        return _MISSING
