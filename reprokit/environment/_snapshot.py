"""Record the environment a bug was packed in, without leaking anything private.

A maintainer replaying an archive needs to know what produced it: Python and
package versions, the backend and its devices, every jax config value and the
XLA flags, because each of these can change the bits a layer computes. The
archive is attached to a public GitHub issue, so the snapshot must never carry
secrets, tokens, user names, host names or home paths.

Two rules keep it that way:

* The snapshot is an allow-list of fields. Nothing is copied wholesale from
  `os.environ`; environment variables are recorded only when their name is on
  a fixed list, and `XLA_FLAGS` only token by token when a token looks like an
  XLA flag.
* Every string that does go in passes through `scrub_text` (see `_scrub`),
  and values that are paths or network addresses are replaced by placeholders
  outright, since a path outside the home directory can still name a person
  or a project.

Environment-variable allow-list (see `_ENV_EXACT`): `JAX_*` (more precisely,
any variable named like a jax config option in upper case, which is how jax
reads them), `XLA_FLAGS`, `LIBTPU_INIT_ARGS`, `*_VISIBLE_DEVICES` for
CUDA/ROCm/HIP, `NVIDIA_TF32_OVERRIDE` (changes GPU matmul numerics),
`XLA_PYTHON_CLIENT_*` memory settings (out-of-memory bugs), and only the
topology-describing `TPU_*` variables. `TPU_*` is not taken as a wildcard
because `TPU_NAME`, `TPU_WORKER_HOSTNAMES` and `TPU_PROCESS_ADDRESSES` hold
user-chosen names and host addresses.
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata
import math
import os
import platform
import re
import sys
from typing import Any

from reprokit.environment._scrub import scrub_text
from reprokit.portable._jax_config import PATH_PLACEHOLDER, REDACTED_PLACEHOLDER, looks_like_path

__all__ = ["capture_environment", "jax_config_snapshot"]

# Always reported, None when not installed, so a maintainer sees "absent"
# rather than wondering whether it was looked up.
_CORE_PACKAGES = (
    "jax",
    "jaxlib",
    "penzai",
    "numpy",
    "ml_dtypes",
    "orbax-checkpoint",
    "msgpack",
    "treescope",
    "reprokit",
    # Optional (`reprokit[flax]`), but a Flax model's numerics depend on it.
    "flax",
)
# Accelerator plugins ship their own copy of XLA, so their versions matter for
# GPU/TPU bugs; reported only when installed to keep CPU snapshots short.
_PLUGIN_PACKAGES = (
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "jax-rocm60-plugin",
    "jax-rocm60-pjrt",
    "libtpu",
    "libtpu-nightly",
)

_ENV_EXACT = frozenset(
    {
        "JAX_PLATFORMS",
        "XLA_FLAGS",
        "LIBTPU_INIT_ARGS",
        "CUDA_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "NVIDIA_TF32_OVERRIDE",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_PYTHON_CLIENT_ALLOCATOR",
        "TPU_ACCELERATOR_TYPE",
        "TPU_CHIPS_PER_PROCESS_BOUNDS",
        "TPU_PROCESS_BOUNDS",
        "TPU_CHIPS_PER_HOST_BOUNDS",
        "TPU_HOST_BOUNDS",
        "TPU_VISIBLE_CHIPS",
    }
)

_XLA_FLAG_TOKEN = re.compile(r"^--xla_[a-z0-9_]+(=[^\s]*)?$")
# libtpu takes XLA flags plus its own (--megascale_..., --2a886c8_...).
_LIBTPU_FLAG_TOKEN = re.compile(r"^--[a-z0-9_]+(=[^\s]*)?$")
# String options whose values name places: recorded as placeholders.
_PRIVATE_CONFIG_VALUE = re.compile(
    r"address|host|url|target|socket|regex|schema|options|_dir$|_path$|_file$|_to$"
)
# Flags whose value is a file or folder on the packing machine, even a relative one
# (--xla_dump_to=dumps): recorded as a placeholder, which replay then leaves out.
_NAMES_A_FILE = re.compile(r"(_to|_dir|_file|_path|_prefix)$")


def _json_safe_config_value(name: str, value: Any, meta: dict[str, Any]) -> Any:
    # Before the int test: some of jax's option enums are IntEnums.
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # JSON has no NaN/Inf; `_decode_config_value` turns these back.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _safe_config_string(name, value, meta)
    if hasattr(value, "platform") and hasattr(value, "id"):
        # jax_default_device holds a Device; its platform and index suffice.
        return {"device": f"{value.platform}:{value.id}"}
    # Anything else is recorded by type only: its repr is not allow-listed.
    return {"type": type(value).__name__}


def _safe_config_string(name: str, value: str, meta: dict[str, Any]) -> str:
    if not value:
        return value
    enum_values = meta.get(name, (None, None, {}))[2].get("enum_values") or ()
    if value in enum_values:
        # A fixed choice of jax's own; scrubbing could only corrupt it.
        return value
    if looks_like_path(value):
        return PATH_PLACEHOLDER
    if _PRIVATE_CONFIG_VALUE.search(name):
        return REDACTED_PLACEHOLDER
    return scrub_text(value)


def jax_config_snapshot() -> dict[str, Any]:
    """Return every jax config option and its effective value, JSON-safe.

    Values come from `jax.config.values`, so context-manager overrides active
    in the calling thread are included. Enum values are recorded by name;
    strings that are paths become `<path>`, those naming addresses, hosts or
    URLs become `<redacted>`, and all others pass through `scrub_text`.
    """
    import jax

    meta = getattr(jax.config, "meta", {})
    values = jax.config.values
    return {name: _json_safe_config_value(name, values[name], meta) for name in sorted(values)}


@functools.cache
def _installed_version(name: str) -> str | None:
    # Cached for the process: reading every distribution's metadata from disk
    # was a third of a small layer's pack, and what this process imported
    # cannot change version while it runs.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _CORE_PACKAGES + _PLUGIN_PACKAGES:
        version = _installed_version(name)
        if name == "reprokit" and version is None:
            # A source checkout is not an installed distribution.
            version = getattr(sys.modules.get("reprokit"), "__version__", None)
        if version is not None or name in _CORE_PACKAGES:
            versions[name] = None if version is None else scrub_text(str(version))
    return versions


def _backend_info() -> dict[str, Any]:
    import jax

    try:
        devices = jax.devices()
        first = devices[0]
        info: dict[str, Any] = {
            "platform": jax.default_backend(),
            "device_kind": scrub_text(str(first.device_kind)),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(),
        }
        client = getattr(first, "client", None)
        version = getattr(client, "platform_version", None)
        if version:
            # e.g. the CUDA/driver version string of a GPU plugin.
            info["platform_version"] = scrub_text(" ".join(str(version).split()))
        return info
    except Exception as error:  # record why, do not fail the pack
        return {
            "platform": None,
            "error": scrub_text(f"{type(error).__name__}: {error}")[:300],
        }


_FLAG_FILE_LIMIT = 1 << 16


def _flag_tokens(raw: str) -> list[str]:
    tokens = raw.split()
    if len(tokens) == 1 and not tokens[0].startswith("--"):
        # XLA reads a value that does not start with "--" as the name of a
        # file holding the flags; record the flags, never the file's name.
        try:
            with open(os.path.expanduser(tokens[0]), encoding="utf-8") as file:
                return file.read(_FLAG_FILE_LIMIT).split()
        except (OSError, UnicodeDecodeError):
            return tokens
    return tokens


def _filter_flags(raw: str, token_pattern: re.Pattern[str]) -> tuple[list[str], int]:
    """Keep tokens shaped like flags; return them (made safe) and the drop count."""
    kept: list[str] = []
    dropped = 0
    for token in _flag_tokens(raw):
        if not token_pattern.match(token):
            # Free text, a mistyped flag or something private: never recorded.
            dropped += 1
            continue
        name, sep, value = token.partition("=")
        if sep and (looks_like_path(value) or _NAMES_A_FILE.search(name)):
            # Dump and data directories describe the packing machine.
            token = f"{name}={PATH_PLACEHOLDER}"
        elif sep:
            token = f"{name}={scrub_text(value)}"
        kept.append(token)
    return kept, dropped


def _env_vars(config_names: set[str], xla_flags: list[str], meta: dict[str, Any]) -> dict[str, str]:
    recorded: dict[str, str] = {}
    for name in sorted(os.environ):
        value = os.environ[name]
        option = name.lower()
        if name == "XLA_FLAGS":
            recorded[name] = " ".join(xla_flags)
        elif name == "LIBTPU_INIT_ARGS":
            recorded[name] = " ".join(_filter_flags(value, _LIBTPU_FLAG_TOKEN)[0])
        elif name == option.upper() and option in config_names:
            # jax reads os.getenv(option.upper()) as the option's default.
            recorded[name] = _safe_config_string(option, value, meta)
        elif name in _ENV_EXACT:
            recorded[name] = "" if not value else scrub_text(value)
    return recorded


def capture_environment() -> dict[str, Any]:
    """Return a JSON-safe snapshot of this process's environment (imports jax).

    Keys: `python`, `python_implementation`, `os`, `machine`, `packages`
    (distribution versions, None when absent), `backend` (default platform,
    device kind and counts), `jax_config` (see `jax_config_snapshot`),
    `env_vars` (allow-listed variables only, see the module docstring),
    `xla_flags` (the tokens of `XLA_FLAGS` shaped like `--xla_name[=value]`,
    read from the flag file when `XLA_FLAGS` names one, as XLA does; path
    values become `<path>`) and `xla_flags_dropped` (how many other tokens
    were left out; their text is never recorded). Initialises jax's default backend if it is not yet.
    """
    import jax

    meta = getattr(jax.config, "meta", {})
    xla_flags, dropped = _filter_flags(os.environ.get("XLA_FLAGS", ""), _XLA_FLAG_TOKEN)
    config = jax_config_snapshot()
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "os": platform.system(),
        "machine": platform.machine(),
        "packages": _package_versions(),
        "backend": _backend_info(),
        "jax_config": config,
        "env_vars": _env_vars(set(config), xla_flags, meta),
        "xla_flags": xla_flags,
        "xla_flags_dropped": dropped,
    }
