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
* Every string that does go in passes through `scrub_text`, and values that
  are paths or network addresses are replaced by placeholders outright, since
  a path outside the home directory can still name a person or a project.

On the replay side this module decides which recorded jax config entries to
re-apply (those that describe the computation, not the machine), tests which
recorded XLA flags this machine's XLA accepts (an unknown flag aborts the
process), and compares two snapshots for the replay report.

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

import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import getpass
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from reprokit._errors import ReplayError

__all__ = [
    "ABSENT",
    "HOME_PLACEHOLDER",
    "HOST_PLACEHOLDER",
    "PATH_PLACEHOLDER",
    "REDACTED_PLACEHOLDER",
    "USER_PLACEHOLDER",
    "EnvDifference",
    "apply_jax_config",
    "capture_environment",
    "check_xla_flags",
    "diff_environments",
    "format_environment_summary",
    "format_environment_table",
    "jax_config_snapshot",
    "replayable_xla_flags",
    "restorable_config_items",
    "scrub_text",
]

# Recorded in `EnvDifference` for a field one snapshot lacks. A string rather
# than a private object so differences stay JSON-safe for reports; `None` is
# taken (it is a real config value, e.g. jax_default_matmul_precision).
ABSENT = "(absent)"

HOME_PLACEHOLDER = "<home>"
USER_PLACEHOLDER = "<user>"
HOST_PLACEHOLDER = "<host>"
REDACTED_PLACEHOLDER = "<redacted>"
PATH_PLACEHOLDER = "<path>"
UUID_PLACEHOLDER = "<uuid>"
_PLACEHOLDER = re.compile(r"<(?:home|user|host|redacted|path|uuid)>")

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

# jax config options recorded here change what a computation returns (or
# whether it raises). They drive `EnvDifference.version_sensitive` and the
# summary; the values are jax's defaults (0.4.3x to 0.10), in recorded form,
# used only to decide what the summary calls "non-default".
_NUMERICS_DEFAULTS: dict[str, Any] = {
    "jax_enable_x64": False,
    "jax_default_matmul_precision": None,
    "jax_threefry_partitionable": True,
    "jax_default_prng_impl": "threefry2x32",
    "jax_enable_custom_prng": False,
    "jax_legacy_prng_key": "ALLOW",
    "jax_random_seed_offset": 0,
    "jax_high_dynamic_range_gumbel": False,
    "jax_threefry_gpu_kernel_lowering": False,
    "jax_numpy_dtype_promotion": "STANDARD",
    "jax_numpy_rank_promotion": "allow",
    "jax_explicit_x64_dtypes": "WARN",
    "jax_allow_f16_reductions": True,
    "jax_softmax_custom_jvp": False,
    "jax_disable_jit": False,
    "jax_debug_nans": False,
    "jax_debug_infs": False,
    "jax_error_checking_behavior_nan": "ignore",
    "jax_error_checking_behavior_divide": "ignore",
    "jax_error_checking_behavior_oob": "ignore",
    "jax_optimization_level": "UNKNOWN",
    "jax_exec_time_optimization_effort": 0.0,
    "jax_disable_most_optimizations": False,
    "jax_use_magma": "auto",
    "jax_use_shardy_partitioner": True,
}
_NUMERICS_CONFIG = frozenset(_NUMERICS_DEFAULTS)

# Config options describing the machine or the tooling around a run rather
# than the computation: replaying them would point at the packer's caches,
# devices or cluster, or just change logging. Never applied, and not worth a
# line in the verdict when they differ.
_MACHINE_CONFIG = re.compile(
    r"cache|platform|backend|visible_devices|num_cpu_devices|default_device|mock_"
    r"|pjrt|client|distributed|coordinator|cross_host|share_binary|preemption"
    r"|recoverability|topology|collectives|timeout|address|socket|host"
    r"|log|dump|profil|pgle|traceback|pprint|color|source_url|source_file"
    r"|transfer_guard|garbage_collection_guard|thread_guard|proxy|leaked_clients"
    r"|captured_constants|_dir$|_path$|_file$|_to$"
)
# The only config options a replay applies: each changes what is traced,
# compiled or computed, takes a bool, number or named choice, and was checked to
# neither write files nor reach the network. The recorded config comes from an
# untrusted archive, so an option a later jax adds is reported, not applied,
# until it is reviewed and listed here.
_REPLAYED_CONFIG = frozenset(
    {
        "check_vma",
        "eager_constant_folding",
        "jax_allow_f16_reductions",
        "jax_auto_pcast",
        "jax_bcoo_cusparse_lowering",
        "jax_check_static_indices",
        "jax_check_tracer_leaks",
        "jax_compiler_enable_remat_pass",
        "jax_custom_vjp3",
        "jax_debug_infs",
        "jax_debug_key_reuse",
        "jax_debug_nans",
        "jax_default_matmul_precision",
        "jax_default_prng_impl",
        "jax_disable_bwd_checks",
        "jax_disable_jit",
        "jax_disable_most_optimizations",
        "jax_disable_vmap_shmap_error",
        "jax_disallow_mesh_context_manager",
        "jax_dynamic_shapes",
        "jax_embedded_constants_max_bytes",
        "jax_enable_checks",
        "jax_enable_custom_prng",
        "jax_enable_x64",
        "jax_error_checking_behavior_divide",
        "jax_error_checking_behavior_nan",
        "jax_error_checking_behavior_oob",
        "jax_exec_time_optimization_effort",
        "jax_experimental_unsafe_xla_runtime_errors",
        "jax_explicit_x64_dtypes",
        "jax_high_dynamic_range_gumbel",
        "jax_legacy_prng_key",
        "jax_memory_fitting_effort",
        "jax_memory_fitting_level",
        "jax_mosaic_allow_hlo",
        "jax_mutable_array_checks",
        "jax_no_execution",
        "jax_no_tracing",
        "jax_numpy_dtype_promotion",
        "jax_numpy_rank_promotion",
        "jax_optimization_level",
        "jax_pallas_enable_debug_checks",
        "jax_pallas_poison_buffers",
        "jax_pallas_use_mosaic_gpu",
        "jax_pallas_verbose_errors",
        "jax_ragged_dot_use_gpu_pallas_triton_lowering",
        "jax_ragged_dot_use_ragged_dot_instruction",
        "jax_random_seed_offset",
        "jax_refs_to_pins",
        "jax_remat3",
        "jax_remove_size_one_mesh_axis_from_type",
        "jax_scan3",
        "jax_softmax_custom_jvp",
        "jax_threefry_gpu_kernel_lowering",
        "jax_threefry_partitionable",
        "jax_use_direct_linearize",
        "jax_use_emit_pipeline_primitive",
        "jax_use_magma",
        "jax_use_shardy_partitioner",
        "jax_use_simplified_jaxpr_constants",
    }
)
# String options whose values name places: recorded as placeholders.
_PRIVATE_CONFIG_VALUE = re.compile(
    r"address|host|url|target|socket|regex|schema|options|_dir$|_path$|_file$|_to$"
)

_SECRET_ENV_NAME = re.compile(
    r"TOKEN|SECRET|PASS|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.IGNORECASE
)
# Values of secret-named variables too common to be secrets; replacing them
# everywhere would only mangle text ("true", "1", ...).
_TRIVIAL_VALUES = frozenset(
    {"true", "false", "yes", "no", "on", "off", "none", "null", "0", "1", "-1"}
)
# Account and machine names shared by countless machines identify nobody, and
# replacing them ("root", "ubuntu") would garble ordinary text.
_GENERIC_NAMES = frozenset(
    {
        "root",
        "user",
        "admin",
        "ubuntu",
        "debian",
        "runner",
        "jovyan",
        "nobody",
        "vscode",
        "codespace",
        "ec2-user",
        "colab",
        "docker",
        "app",
        "builder",
        "ci",
        "guest",
        "default",
        "localhost",
        "localhost.localdomain",
        "(none)",
    }
)
# Names shorter than this are replaced only as whole tokens (e.g. between
# slashes), never next to underscores or dots where they would hit code words.
_SHORT_NAME = 4
# Secret values shorter than this are replaced only as whole tokens.
_SHORT_SECRET = 8

_SECRET_KEY_WORDS = (
    r"password|passwd|passphrase|token|secret|api[_-]?key|access[_-]?key"
    r"|private[_-]?key|secret[_-]?key|credentials?|cookie|auth|authorization"
    r"|session[_-]?(?:id|key|token)"
)
_FREE_TEXT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host
    (
        re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,31}://)[^/\s:@]+:[^/\s@]+@"),
        rf"\1{REDACTED_PLACEHOLDER}@",
    ),
    # password=..., "token": "...", HF_TOKEN=... (not "--token VALUE": in
    # prose that would eat the word after every "token").
    (
        re.compile(
            rf"(?i)((?:{_SECRET_KEY_WORDS})\b[\"']?)(\s*[:=]\s*)"
            r"((?:bearer\s+|basic\s+)?(?:\"[^\"]*\"|'[^']*'|[^\s,;&'\"]+))"
        ),
        rf"\1\2{REDACTED_PLACEHOLDER}",
    ),
    (
        re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
        rf"\1 {REDACTED_PLACEHOLDER}",
    ),
    # Well-known token shapes, in case one sits in free text with no key.
    (
        re.compile(
            r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
            r"|hf_[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}"
            r"|xox[abprs]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{20,})\b"
        ),
        REDACTED_PLACEHOLDER,
    ),
    # GPU and MIG UUIDs (CUDA_VISIBLE_DEVICES, error messages) identify a card.
    (
        re.compile(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
        UUID_PLACEHOLDER,
    ),
)


# ---------------------------------------------------------------------------
# Scrubbing


def _home_candidates() -> set[str]:
    homes = {os.environ.get("HOME", ""), os.environ.get("USERPROFILE", "")}
    homes.add(os.path.expanduser("~"))
    try:
        import pwd

        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError, AttributeError):
        pass
    # A symlinked home shows up under its real path in tracebacks.
    homes |= {os.path.realpath(h) for h in homes if h}
    cleaned = set()
    for home in homes:
        home = home.rstrip("/\\")
        # "/" or "" as home would replace every slash.
        if len(home) >= 2:
            cleaned.add(home)
    return cleaned


def _user_candidates() -> set[str]:
    users = {os.environ.get(name, "") for name in ("USER", "LOGNAME", "USERNAME")}
    try:
        users.add(getpass.getuser())
    except Exception:  # no user name to hide is fine
        pass
    try:
        import pwd

        users.add(pwd.getpwuid(os.getuid()).pw_name)
    except (ImportError, KeyError, AttributeError):
        pass
    return {u for u in users if u and u.lower() not in _GENERIC_NAMES}


def _host_candidates() -> set[str]:
    # socket.getfqdn() is left out on purpose: it can block on DNS.
    hosts = {socket.gethostname(), platform.node()}
    hosts |= {h.split(".")[0] for h in hosts}
    return {h for h in hosts if h and h.lower() not in _GENERIC_NAMES}


def _secret_values() -> set[str]:
    secrets = set()
    for name, value in os.environ.items():
        if not _SECRET_ENV_NAME.search(name):
            continue
        value = value.strip()
        if len(value) >= 4 and value.lower() not in _TRIVIAL_VALUES:
            secrets.add(value)
    return secrets


def _name_pattern(name: str) -> str:
    escaped = re.escape(name)
    if len(name) < _SHORT_NAME:
        return rf"(?<![\w.-])(?i:{escaped})(?![\w.-])"
    # Long names are specific enough to replace inside identifiers such as
    # "alice_runs" or "alice-laptop"; only letters and digits bound them.
    return rf"(?<![A-Za-z0-9])(?i:{escaped})(?![A-Za-z0-9])"


@functools.lru_cache(maxsize=8)
def _identity_regex(
    identities: tuple[tuple[str, str], ...],
) -> tuple[re.Pattern[str] | None, dict[str, str]]:
    """One alternation over all private literals, longest first.

    A single pass means a placeholder inserted for one identity is never
    matched again by another (a user called "home" must not turn "<home>"
    into "<<user>>").
    """
    placeholders = {
        "secret": REDACTED_PLACEHOLDER,
        "home": HOME_PLACEHOLDER,
        "host": HOST_PLACEHOLDER,
        "user": USER_PLACEHOLDER,
    }
    parts = []
    groups: dict[str, str] = {}
    for index, (kind, literal) in enumerate(identities):
        if kind == "secret":
            if len(literal) < _SHORT_SECRET:
                body = rf"(?<!\w){re.escape(literal)}(?!\w)"
            else:
                body = re.escape(literal)
        elif kind == "home":
            body = rf"(?<![\w.-]){re.escape(literal)}(?![\w.-])"
        else:
            body = _name_pattern(literal)
        group = f"g{index}"
        parts.append(f"(?P<{group}>{body})")
        groups[group] = placeholders[kind]
    if not parts:
        return None, groups
    return re.compile("|".join(parts)), groups


def _identities() -> tuple[tuple[str, str], ...]:
    # Earlier kinds win when one literal is several things (host == user).
    priority = {"secret": 0, "home": 1, "host": 2, "user": 3}
    found: dict[str, str] = {}
    for kind, values in (
        ("secret", _secret_values()),
        ("home", _home_candidates()),
        ("host", _host_candidates()),
        ("user", _user_candidates()),
    ):
        for value in values:
            if value not in found or priority[kind] < priority[found[value]]:
                found[value] = kind
    ordered = sorted(found.items(), key=lambda item: (-len(item[0]), item[0]))
    return tuple((kind, literal) for literal, kind in ordered)


def scrub_text(text: str) -> str:
    """Return `text` with private details of this machine replaced by placeholders.

    Replaced: the home directory (`$HOME`, the expanded `~`, the passwd entry
    and their real paths) by `<home>`; the host name (`socket.gethostname`,
    `platform.node`, and their first label) by `<host>`; the user name
    (`getpass.getuser`, `$USER`, `$LOGNAME`, the passwd entry) by `<user>`;
    the value of every environment variable whose name looks secret (contains
    TOKEN, SECRET, PASS, KEY, CREDENTIAL, AUTH, COOKIE, SESSION or PRIVATE)
    by `<redacted>`; and in free text, values after `password=`, `token:`,
    `api_key=`-like keys, URL credentials, bearer tokens, well-known token
    shapes (GitHub, Hugging Face, AWS, OpenAI, Slack, GitLab) and UUIDs.

    User and host names shorter than four characters are replaced only where
    they stand alone (between slashes, spaces, `@`...), so that a user called
    `a` does not garble every word; generic names such as `root`, `ubuntu` or
    `localhost` identify nobody and are left alone.
    """
    if not text:
        return text
    regex, groups = _identity_regex(_identities())
    if regex is not None:
        text = regex.sub(lambda match: groups[match.lastgroup or ""], text)
    for pattern, replacement in _FREE_TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


# Flags whose value is a file or folder on the packing machine, even a relative one
# (--xla_dump_to=dumps): recorded as a placeholder, which replay then leaves out.
_NAMES_A_FILE = re.compile(r"(_to|_dir|_file|_path|_prefix)$")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith("~")


# ---------------------------------------------------------------------------
# Capture


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
    if _looks_like_path(value):
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


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _CORE_PACKAGES + _PLUGIN_PACKAGES:
        try:
            version: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
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
        if sep and (_looks_like_path(value) or _NAMES_A_FILE.search(name)):
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


# ---------------------------------------------------------------------------
# Replay: jax config


def _config_part(recorded: dict[str, Any]) -> dict[str, Any]:
    # Accept a whole snapshot as well as its "jax_config" part.
    inner = recorded.get("jax_config")
    return inner if isinstance(inner, dict) else recorded


def _describes_machine(name: str, value: Any) -> bool:
    if _MACHINE_CONFIG.search(name):
        return True
    return isinstance(value, str) and (
        _looks_like_path(value) or value in (PATH_PLACEHOLDER, REDACTED_PLACEHOLDER)
    )


def restorable_config_items(recorded: dict[str, Any]) -> dict[str, Any]:
    """Return the recorded jax config entries a replay should apply, in order.

    `recorded` is a snapshot from `capture_environment` or its `jax_config`
    part. Only options on reprokit's reviewed list of computation settings
    are kept (precision, x64, PRNG, promotion, debug checks, optimization
    levels, ...), and not those whose value is path-like or had private text
    removed; machine settings (caches, platforms, logging, dumps, cluster)
    never are. `jax_enable_x64` comes first: arrays decoded before it is set
    are silently truncated to 32 bits. Values are in recorded (JSON) form.
    """
    config = _config_part(recorded)
    items = {
        name: value
        for name, value in config.items()
        if name in _REPLAYED_CONFIG and not _describes_machine(name, value)
    }
    if "jax_enable_x64" in items:
        items = {"jax_enable_x64": items.pop("jax_enable_x64"), **items}
    return items


def _unreviewed_config_items(recorded: dict[str, Any]) -> dict[str, Any]:
    # Recorded options that are neither applied nor machine settings: a replay
    # reports them when they could matter, so the verdict's reader knows.
    config = _config_part(recorded)
    return {
        name: value
        for name, value in config.items()
        if isinstance(name, str)
        and name not in _REPLAYED_CONFIG
        and not _describes_machine(name, value)
    }


class _NotRestorable(Exception):
    pass


def _decode_config_value(name: str, value: Any, current: Any, meta: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        raise _NotRestorable("recorded without its value")
    if isinstance(value, str) and _PLACEHOLDER.search(value):
        raise _NotRestorable(f"value {value!r} had private text removed when packed")
    entry = meta.get(name)
    enum_class = None
    if entry is not None and entry[0] == "enum_class":
        enum_class = entry[2].get("enum_class")
    if enum_class is None and isinstance(current, enum.Enum):
        enum_class = type(current)
    if enum_class is not None and value is not None:
        # Recorded by name; older archives or hand edits may hold the value.
        if isinstance(value, str) and value in enum_class.__members__:
            return enum_class[value]
        try:
            return enum_class(value)
        except ValueError as error:
            raise _NotRestorable(f"invalid value {value!r}") from error
    if isinstance(current, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError as error:
            raise _NotRestorable(f"invalid value {value!r}") from error
    return value


@contextlib.contextmanager
def restored_jax_config() -> Iterator[None]:
    """Puts back every jax config value that changed inside the block (they are process-wide).

    Replaying an archive in-process applies its recorded config; callers that
    replay many archives (fuzzing, regression tests) undo it afterwards. A
    value jax no longer accepts stays as the archive set it.
    """
    import jax

    before = dict(jax.config.values)
    try:
        yield
    finally:
        for name, value in before.items():
            now = jax.config.values.get(name)
            if now is value or (type(now) is type(value) and now == value):
                continue
            with contextlib.suppress(Exception):
                jax.config.update(name, value)


def apply_jax_config(recorded: dict[str, Any]) -> list[str]:
    """Apply recorded jax config values that differ here; report what could not be.

    Uses `restorable_config_items` to pick entries (so machine settings are
    skipped and `jax_enable_x64` goes first), converts enum options back to
    their enum instances and calls `jax.config.update` for every value that
    differs from the current one. Never raises for a bad entry: returns one
    human-readable line per entry that is unknown to this jax version, whose
    value was refused, or that differs here but is not on the reviewed list
    (so was not applied). Call it before decoding any array.
    """
    import jax

    meta = getattr(jax.config, "meta", {})
    problems: list[str] = []
    reviewed = restorable_config_items(recorded)
    # Unreviewed options go through the same checks, to be reported when they
    # could matter, but are never applied.
    for name, value in {**reviewed, **_unreviewed_config_items(recorded)}.items():
        # The archive chose these names and values: keep each line short.
        entry = f"{name[:80]}={_clipped_repr(value)}"
        if name not in jax.config.values:
            problems.append(f"jax config {entry}: unknown to jax {jax.__version__}, not applied")
            continue
        current = jax.config.values[name]
        try:
            wanted = _decode_config_value(name, value, current, meta)
        except _NotRestorable as error:
            if name in reviewed:
                problems.append(f"jax config {name}: {error}, not applied")
                continue
            wanted = value
        if type(wanted) is type(current) and wanted == current:
            continue
        if name not in reviewed:
            problems.append(
                f"jax config {entry}: not on reprokit's list of options a replay applies"
                " (set it by hand to try it), not applied"
            )
            continue
        try:
            jax.config.update(name, wanted)
        except Exception as error:  # any refusal is reported
            problems.append(
                f"jax config {entry}: refused by jax {jax.__version__}"
                f" ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
            )
    return problems


def _clipped_repr(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------
# Replay: XLA flags


def replayable_xla_flags(flags: list[str]) -> tuple[list[str], list[str]]:
    """Split recorded XLA flags into (worth replaying, machine-specific).

    A flag whose value was replaced by a placeholder (`<path>`, `<home>`,
    `<redacted>`...) pointed at the packing machine; setting it here would
    create directories with those literal names or pass a meaningless value.
    """
    keep: list[str] = []
    drop: list[str] = []
    for flag in flags:
        value = flag.partition("=")[2]
        (drop if _PLACEHOLDER.search(value) else keep).append(flag)
    return keep, drop


_PROBE = "import jax; jax.devices()"
_PROBE_TIMEOUT_S = 60.0


def _flags_start_jax(flags: list[str], timeout: float) -> bool:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(flags)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def check_xla_flags(
    flags: list[str], timeout: float = _PROBE_TIMEOUT_S
) -> tuple[list[str], list[str]]:
    """Return (accepted, rejected) XLA flags on this machine.

    XLA aborts a process that starts with an unknown flag in `XLA_FLAGS`, so
    each test runs `import jax; jax.devices()` in a child interpreter with this
    process's environment and `XLA_FLAGS` replaced. All flags are tried
    together first (one start-up, about half a second); if that fails, each
    flag alone, in parallel, each bounded by `timeout` seconds. Tokens not
    shaped like `--xla_name[=value]`, and flags whose value was replaced by a
    placeholder when packed (`--xla_dump_to=<path>`: XLA would accept it and
    dump into a folder of that name; see `replayable_xla_flags`), are
    rejected without running anything.
    An empty list costs nothing. Flags accepted one by one are not re-tested
    together.

    Raises:
        ReplayError: when jax cannot start in a child process even without
            flags, so the flags cannot be judged.
    """
    accepted: list[str] = []
    rejected: list[str] = []
    for flag in dict.fromkeys(flags):
        usable = _XLA_FLAG_TOKEN.match(flag) and not _PLACEHOLDER.search(flag)
        (accepted if usable else rejected).append(flag)
    if not accepted or _flags_start_jax(accepted, timeout):
        return accepted, rejected
    if len(accepted) == 1:
        results = [False]
    else:
        workers = min(len(accepted), max(2, os.cpu_count() or 2), 8)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda f: _flags_start_jax([f], timeout), accepted))
    if not any(results) and not _flags_start_jax([], timeout):
        raise ReplayError(
            f"cannot judge XLA flags: '{sys.executable} -c \"{_PROBE}\"' fails even "
            "without XLA_FLAGS; check that jax imports in this environment"
        )
    good = [f for f, ok in zip(accepted, results, strict=True) if ok]
    bad = [f for f, ok in zip(accepted, results, strict=True) if not ok]
    return good, rejected + bad


# ---------------------------------------------------------------------------
# Comparison and reports


@dataclasses.dataclass(frozen=True)
class EnvDifference:
    """One field that differs between the recorded and the current environment.

    `field` is dotted (`packages.jax`, `backend.platform`,
    `jax_config.jax_enable_x64`, `env_vars.XLA_FLAGS`, `xla_flags`);
    `recorded`/`current` hold the snapshot values, `ABSENT` where one side
    lacks the field. `version_sensitive` marks differences known to change
    numerical results: versions of python, jax, jaxlib, penzai, numpy,
    ml_dtypes and accelerator plugins, platform and device kind, numerics
    config and XLA flags.
    """

    field: str
    recorded: Any
    current: Any
    version_sensitive: bool


def _flatten(env: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in env.items():
        if isinstance(value, dict):
            for inner_key, inner_value in value.items():
                flat[f"{key}.{inner_key}"] = inner_value
        else:
            flat[key] = value
    return flat


_SENSITIVE_FIELDS = frozenset(
    {
        "python",
        "python_implementation",
        "packages.jax",
        "packages.jaxlib",
        "packages.penzai",
        "packages.numpy",
        "packages.ml_dtypes",
        "backend.platform",
        "backend.device_kind",
        "backend.platform_version",
        "xla_flags",
        "env_vars.XLA_FLAGS",
        "env_vars.LIBTPU_INIT_ARGS",
        "env_vars.NVIDIA_TF32_OVERRIDE",
    }
    | {f"jax_config.{name}" for name in _NUMERICS_CONFIG}
    | {f"env_vars.{name.upper()}" for name in _NUMERICS_CONFIG}
    | {f"packages.{name}" for name in _PLUGIN_PACKAGES}
)


def diff_environments(recorded: dict[str, Any], current: dict[str, Any]) -> list[EnvDifference]:
    """Compare two snapshots field by field.

    Nested sections (`packages`, `backend`, `jax_config`, `env_vars`) are
    compared entry by entry, lists as a whole. Returns version-sensitive
    differences first, then the rest, each group sorted by field name.
    """
    old = _flatten(recorded)
    new = _flatten(current)
    diffs = []
    for field in old.keys() | new.keys():
        before = old.get(field, ABSENT)
        after = new.get(field, ABSENT)
        if before == after and type(before) is type(after):
            continue
        diffs.append(EnvDifference(field, before, after, field in _SENSITIVE_FIELDS))
    diffs.sort(key=lambda d: (not d.version_sensitive, d.field))
    return diffs


def _cell(value: Any, width: int = 60) -> str:
    if isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, list):
        text = " ".join(str(v) for v in value) if value else "[]"
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_environment_table(diffs: list[EnvDifference]) -> str:
    """Render differences as an aligned plain-text table `field | recorded | here`.

    Version-sensitive fields are marked with `*`, explained in a last line.
    """
    if not diffs:
        return "The environment matches the recorded one."
    rows = [
        (d.field + (" *" if d.version_sensitive else ""), _cell(d.recorded), _cell(d.current))
        for d in diffs
    ]
    header = ("field", "recorded", "here")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(row: tuple[str, str, str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))

    lines = [line(header), "-+-".join("-" * width for width in widths)]
    lines += [line(row).rstrip() for row in rows]
    if any(d.version_sensitive for d in diffs):
        lines.append("* may change numerical results")
    return "\n".join(lines)


def format_environment_summary(env: dict[str, Any]) -> str:
    """Describe a snapshot in a few lines: Python, key versions, devices, numerics."""
    packages = env.get("packages") or {}
    backend = env.get("backend") or {}
    config = env.get("jax_config") or {}
    lines = [
        f"Python {env.get('python', '?')} ({env.get('python_implementation', '?')})"
        f" on {env.get('os', '?')} {env.get('machine', '?')}",
        ", ".join(
            f"{name} {packages.get(name) or 'not installed'}"
            for name in ("jax", "jaxlib", "penzai", "numpy")
        ),
    ]
    if backend.get("platform"):
        lines.append(
            f"backend {backend['platform']}: {backend.get('device_count', '?')} x "
            f"{backend.get('device_kind', '?')}, {backend.get('process_count', '?')} process(es)"
        )
    else:
        lines.append(f"backend unavailable: {backend.get('error', 'unknown error')}")
    changed = [
        f"{name}={config[name]!r}"
        for name, default in _NUMERICS_DEFAULTS.items()
        if name in config and config[name] != default
    ]
    lines.append("numerics config: " + (", ".join(changed) if changed else "jax defaults"))
    flags = env.get("xla_flags") or []
    if flags:
        lines.append("XLA_FLAGS: " + " ".join(flags))
    return "\n".join(lines)
