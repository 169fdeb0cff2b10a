"""Throwaway Python environments, one per release, built with `uv` and cached.

Bisecting replays one archive under many releases of jax (or penzai, numpy,
ml_dtypes). Each release needs its own environment: the version under test
pinned (for jax, `jaxlib` of the same number pinned alongside where one
exists), everything else resolved to the newest versions compatible with it,
so that an archive's own pins (which describe the reporter's machine) are
never reused across releases.

`uv` builds such an environment in a second or two once wheels are in its
cache (plain `venv` + `pip` took 16 s here). Environments are cached under
the user's cache folder (`$XDG_CACHE_HOME/reprokit/bisect`, else
`~/.cache/reprokit/bisect`), keyed by the interpreter and the *resolved* set,
so two requests that resolve alike share one. Each is built in a temporary
folder and renamed into place when complete: an interrupted build (Ctrl-C, a
crash) leaves only a `.building-*` folder, which later runs remove, never a
half-built environment under a real key.

Release lists come from the package index's simple API (JSON, else HTML),
at pip's configured index unless `--index-url` says otherwise, so bisecting
sees the index the maintainer's pip sees.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import html.parser
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from reprokit._errors import ReplayError, UsageError

# Packages `--package` may bisect, and the set every environment installs:
# what the rendered replay script imports.
BISECTABLE = ("jax", "penzai", "numpy", "ml_dtypes")
INSTALLED_SET = ("jax", "jaxlib", "penzai", "numpy", "ml_dtypes")
DEFAULT_INDEX = "https://pypi.org/simple"
# jaxlib releases before this one were built against NumPy 1's ABI and fail to
# import under NumPy 2 (jax 0.4.23 measured); their metadata does not say so.
_FIRST_JAX_FOR_NUMPY2 = "0.4.30"
_METADATA = "reprokit-environment.json"
_STALE_BUILD_SECONDS = 6 * 3600
_RELEASE = re.compile(r"[0-9]+(?:\.[0-9]+)*(?:\.post[0-9]+)?")
# Words in uv's errors that mean the index could not be reached at all.
_NETWORK_WORDS = (
    "failed to fetch",
    "error sending request",
    "dns error",
    "connection refused",
    "tcp connect error",
    "network is unreachable",
    "operation timed out",
    "failed to download",
)


class InstallFailed(Exception):
    """This release cannot be installed here (no wheel, no solution, not cached offline).

    Not a `ReprokitError`: bisecting reports it in the release's row as
    "cannot replay" and goes on with the other releases.
    """

    def __init__(self, reason: str):
        super().__init__(" ".join(str(reason).split())[:400])


@dataclasses.dataclass(frozen=True)
class Environment:
    """A built environment: its folder, interpreter, and what was installed in it."""

    path: str
    python: str
    installed: dict[str, str]
    key: str
    reused: bool
    seconds: float


def find_uv() -> str:
    """The `uv` binary: from the `uv` PyPI package, else on PATH."""
    path = None
    try:
        import uv

        path = uv.find_uv_bin()
    except (ImportError, FileNotFoundError, OSError):
        path = None
    path = path or shutil.which("uv")
    if not path:
        raise ReplayError(
            "reprokit bisect builds its environments with uv, which is not installed: "
            "pip install uv (or pip install 'reprokit[bisect]')"
        )
    return path


def cache_root() -> Path:
    """Where environments are cached: `$XDG_CACHE_HOME/reprokit/bisect` or `~/.cache/...`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reprokit" / "bisect"


def configured_index_url() -> str | None:
    """The index pip is configured to use (`PIP_INDEX_URL` or a pip.conf), or None for the default.

    uv reads no pip configuration, so bisecting passes this on to it: the
    releases listed and installed come from the index the maintainer's pip uses.
    """
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    files = [
        os.path.join(d, "pip", "pip.conf")
        for d in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    ]
    files += ["/etc/pip.conf", os.path.join(os.path.expanduser("~"), ".pip", "pip.conf")]
    files += [os.path.join(config_home, "pip", "pip.conf"), os.path.join(sys.prefix, "pip.conf")]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(os.environ["PIP_CONFIG_FILE"])
    value = None
    for name in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(name, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if parser.has_option(section, "index-url"):
                value = parser.get(section, "index-url").strip() or value
    return value


def version_key(version: str) -> tuple:
    """Orders final releases: '0.4.9' < '0.4.10' < '0.4.10.post1'."""
    release, _, post = version.partition(".post")
    return tuple(int(part) for part in release.split(".")) + ((int(post),) if post else (-1,))


def is_release(version: str) -> bool:
    """A final release (no rc, dev, alpha or local part)."""
    return bool(_RELEASE.fullmatch(version))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _ssl_context() -> ssl.SSLContext:
    for variable in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        path = os.environ.get(variable)
        if path and os.path.isfile(path):
            return ssl.create_default_context(cafile=path)
    return ssl.create_default_context()


class _Links(html.parser.HTMLParser):
    """Anchors of a PEP 503 simple page: (file name, yanked)."""

    def __init__(self):
        super().__init__()
        self.files: list[tuple[str, bool]] = []
        self._yanked: bool | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            values = dict(attrs)
            href = values.get("href") or ""
            name = urllib.parse.unquote(urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1])
            self.files.append((name, "data-yanked" in values))


def _version_of(filename: str, package: str) -> str | None:
    name = filename
    if name.endswith(".whl"):
        parts = name.split("-")
        return parts[1] if len(parts) >= 5 else None
    for suffix in (".tar.gz", ".zip", ".tar.bz2"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            head, _, version = stem.rpartition("-")
            return version if _canonical(head) == _canonical(package) else None
    return None


def list_versions(package: str, index_url: str | None = None, *, timeout: float = 60) -> list[str]:
    """Final releases of `package` on the index, oldest first (yanked ones left out).

    Raises:
      ReplayError: the index cannot be reached (one line, with what to do).
      UsageError: the index has no such package.
    """
    base = (
        index_url
        or os.environ.get("UV_DEFAULT_INDEX")
        or os.environ.get("UV_INDEX_URL")
        or DEFAULT_INDEX
    ).rstrip("/")
    url = f"{base}/{_canonical(package)}/"
    if url.startswith("file:"):
        url += "index.html"
    request = urllib.request.Request(
        url, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    shown = _public_url(base)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=_ssl_context()) as response:
            body = response.read(256 * 2**20)
            kind = response.headers.get_content_type() if response.headers else ""
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise UsageError(f"the package index {shown} has no package {package!r}") from None
        raise ReplayError(
            f"cannot list the releases of {package} on {shown} (HTTP {error.code}); "
            "give them with --versions A,B,C"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ReplayError(
            f"cannot reach the package index {shown} ({' '.join(str(reason).split())[:120]}); "
            "check the network or --index-url, or replay environments built before with "
            "--offline --versions A,B,C"
        ) from None
    files: list[tuple[str, bool]]
    if kind.endswith("json"):
        try:
            data = json.loads(body)
            files = [(f["filename"], bool(f.get("yanked"))) for f in data.get("files", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReplayError(
                f"the package index {shown} sent a malformed page for {package}"
            ) from None
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        files = parser.files
    versions: dict[str, bool] = {}
    for filename, yanked in files:
        version = _version_of(filename, package)
        if version and is_release(version):
            # A release counts if any of its files is not yanked.
            versions[version] = versions.get(version, False) or not yanked
    return sorted((v for v, ok in versions.items() if ok), key=version_key)


def _public_url(url: str) -> str:
    """The index URL without credentials (user:password@ must never be printed)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def requirements(
    package: str,
    version: str,
    jaxlib_versions: set[str] | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """What to install to replay under `package==version`: that pin, the rest newest compatible.

    For jax, `jaxlib` of the same number is pinned when it exists (some jax
    releases have none: the resolver then picks the newest jaxlib that jax
    release accepts), and jax releases built before NumPy 2 get `numpy<2`.
    `extra` packages (flax, for a record made through penzai's Flax bridge)
    resolve to the newest compatible versions too.
    """
    if package not in BISECTABLE:
        raise UsageError(f"--package must be one of {', '.join(BISECTABLE)}, not {package!r}")
    wanted = {name: name for name in (*INSTALLED_SET, *extra)}
    wanted[package] = f"{package}=={version}"
    if package == "jax":
        if jaxlib_versions is not None and version in jaxlib_versions:
            wanted["jaxlib"] = f"jaxlib=={version}"
        if is_release(version) and version_key(version) < version_key(_FIRST_JAX_FOR_NUMPY2):
            wanted["numpy"] = "numpy<2"
    return list(wanted.values())


def _one_line_uv_error(stderr: str) -> str:
    """uv's error as one line: its explanation ('Because ...') when it gives one."""
    lines = []
    for raw in stderr.splitlines():
        line = raw.strip().lstrip("×╰─▶│├ ").strip()
        line = re.sub(r"^(?:error|caused by|cause):\s*", "", line, flags=re.IGNORECASE)
        if not line or line.startswith(("hint:", "help:", "warning:")):
            continue
        if line.lower().startswith("no solution found"):
            continue
        lines.append(line)
    text = " ".join(lines) or "uv failed without saying why"
    # uv explains a failed resolution in chained sentences; the first says why.
    if text.startswith("Because ") and ". " in text:
        text = text[: text.index(". ") + 1]
    return " ".join(text.split())[:400]


class Builder:
    """Builds (or reuses) one environment per requirement set, with one interpreter."""

    def __init__(
        self,
        *,
        python: str | None = None,
        index_url: str | None = None,
        offline: bool = False,
        cache_dir: str | os.PathLike | None = None,
        uv: str | None = None,
        timeout: float = 1800,
    ):
        self.uv = uv or find_uv()
        self.cache = Path(cache_dir) if cache_dir is not None else cache_root()
        self.index_url = index_url
        self.offline = offline
        self.timeout = timeout
        self.cache.mkdir(parents=True, exist_ok=True)
        self._sweep_stale()
        self.interpreter = self._find_python(python)
        self.identity = self._identity()

    @property
    def python_version(self) -> str:
        return self.identity.split()[0]

    def _run_uv(
        self, args: list[str], *, input_text: str | None = None
    ) -> subprocess.CompletedProcess:
        options = []
        if self.offline:
            options.append("--offline")
        env = dict(os.environ, NO_COLOR="1", UV_NO_PROGRESS="1")
        try:
            # cwd: the cache, so that uv finds no project or uv.toml of the current folder.
            return subprocess.run(
                [self.uv, *args, *options],
                input=input_text,
                capture_output=True,
                text=True,
                cwd=self.cache,
                env=env,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            raise InstallFailed(f"uv took more than {self.timeout:.0f} s") from None
        except OSError as error:
            raise ReplayError(f"cannot run uv at {self.uv!r}: {error.strerror or error}") from None

    def _index_args(self) -> list[str]:
        return ["--index-url", self.index_url] if self.index_url else []

    def _find_python(self, python: str | None) -> str:
        if python is None:
            return sys.executable
        done = self._run_uv(["python", "find", python])
        found = done.stdout.strip().splitlines()
        if done.returncode != 0 or not found:
            raise ReplayError(
                f"no Python {python!r} found on this machine; install it (uv python install "
                f"{python}) or choose another with --python"
            )
        return found[-1]

    def _identity(self) -> str:
        probe = "import sys, sysconfig; print(sys.version.split()[0], sysconfig.get_platform(), sys.implementation.name)"
        try:
            done = subprocess.run(
                [self.interpreter, "-I", "-c", probe], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ReplayError(f"cannot run the Python at {self.interpreter!r}: {error}") from None
        if done.returncode != 0:
            raise ReplayError(f"cannot run the Python at {self.interpreter!r}")
        return done.stdout.strip()

    def _check_network(self, stderr: str) -> None:
        lowered = stderr.lower()
        if not self.offline and any(word in lowered for word in _NETWORK_WORDS):
            shown = _public_url(self.index_url or "the package index")
            raise ReplayError(
                f"cannot reach {shown} to install packages ({_one_line_uv_error(stderr)[:200]}); "
                "check the network, or use --offline to replay with cached packages only"
            )

    def resolve(self, wanted: list[str]) -> list[str]:
        """The exact set uv would install for `wanted`, as sorted `name==version` lines."""
        done = self._run_uv(
            [
                "pip",
                "compile",
                "-",
                "--python",
                self.interpreter,
                "--no-header",
                "--no-annotate",
                "--quiet",
                *self._index_args(),
            ],
            input_text="\n".join(wanted) + "\n",
        )
        if done.returncode != 0:
            self._check_network(done.stderr)
            reason = _one_line_uv_error(done.stderr)
            if self.offline:
                reason += " (--offline: only packages already in uv's cache can be used)"
            raise InstallFailed(f"cannot install: {reason}")
        pins = []
        for line in done.stdout.splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                pins.append(line)
        return sorted(pins, key=str.lower)

    def build(self, wanted: list[str], label: str) -> Environment:
        """An environment holding `wanted`: from the cache when its resolved set was built before."""
        started = time.monotonic()
        resolved = self.resolve(wanted)
        key = hashlib.sha256(
            json.dumps([self.identity, self.index_url or "", resolved]).encode()
        ).hexdigest()[:16]
        safe_label = re.sub(r"[^A-Za-z0-9_.+-]", "_", label)[:60]
        final = self.cache / f"{safe_label}-py{self.python_version}-{key}"
        cached = self._read(final)
        if cached is not None:
            return Environment(
                str(final),
                str(final / "bin" / "python"),
                cached,
                key,
                True,
                time.monotonic() - started,
            )
        holder = Path(tempfile.mkdtemp(prefix=".building-", dir=self.cache))
        try:
            staging = holder / "env"
            done = self._run_uv(
                ["venv", str(staging), "--python", self.interpreter, "--relocatable", "--quiet"]
            )
            if done.returncode != 0:
                raise ReplayError(
                    f"uv cannot create an environment: {_one_line_uv_error(done.stderr)}"
                )
            (holder / "requirements.txt").write_text("\n".join(resolved) + "\n")
            done = self._run_uv(
                [
                    "pip",
                    "install",
                    "--python",
                    str(staging / "bin" / "python"),
                    "--no-deps",
                    "--quiet",
                    "-r",
                    str(holder / "requirements.txt"),
                    *self._index_args(),
                ]
            )
            if done.returncode != 0:
                self._check_network(done.stderr)
                raise InstallFailed(f"cannot install: {_one_line_uv_error(done.stderr)}")
            installed = self._installed(resolved)
            metadata = {
                "requested": wanted,
                "resolved": resolved,
                "installed": installed,
                "python": self.identity,
                "index_url": _public_url(self.index_url) if self.index_url else None,
            }
            # Written last: an environment without it is incomplete and never used.
            (staging / _METADATA).write_text(json.dumps(metadata, indent=1))
            if final.exists() and self._read(final) is None:
                # Not ours (renames are atomic): a folder tampered with, or half deleted.
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(staging, final)
            except OSError:
                # Another bisect built the same set meanwhile: use theirs.
                if self._read(final) is None:
                    raise
        finally:
            shutil.rmtree(holder, ignore_errors=True)
        return Environment(
            str(final),
            str(final / "bin" / "python"),
            installed,
            key,
            False,
            time.monotonic() - started,
        )

    @staticmethod
    def _installed(resolved: list[str]) -> dict[str, str]:
        pins = {}
        for line in resolved:
            name, _, version = line.partition("==")
            pins[_canonical(name.split("[")[0].strip())] = version.split(";")[0].strip()
        shown = (*INSTALLED_SET, "flax")
        return {name: pins[_canonical(name)] for name in shown if _canonical(name) in pins}

    @staticmethod
    def _read(folder: Path) -> dict[str, str] | None:
        try:
            metadata = json.loads((folder / _METADATA).read_text())
        except (OSError, ValueError):
            return None
        if not (folder / "bin" / "python").exists() or not isinstance(
            metadata.get("installed"), dict
        ):
            return None
        return {str(k): str(v) for k, v in metadata["installed"].items()}

    def _sweep_stale(self) -> None:
        """Removes builds interrupted long ago (a kill -9; Ctrl-C cleans up at once)."""
        now = time.time()
        for entry in self.cache.glob(".building-*"):
            try:
                if now - entry.stat().st_mtime > _STALE_BUILD_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass
