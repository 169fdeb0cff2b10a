"""Scrub secrets and identities from any text that goes into an archive.

The archive is attached to a public GitHub issue, so nothing in it may carry
secrets, tokens, user names, host names or home paths. Every string the
snapshot records (and every traceback or message a capture keeps) passes
through `scrub_text`, which replaces this machine's private literals (home,
user, host, the values of secret-named environment variables) and well-known
secret shapes in free text by placeholders. Values that are paths or network
addresses are not scrubbed but replaced outright, by the snapshot, since a
path outside the home directory can still name a person or a project.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import re
import socket

from reprokit.portable._jax_config import (
    HOME_PLACEHOLDER,
    HOST_PLACEHOLDER,
    REDACTED_PLACEHOLDER,
    USER_PLACEHOLDER,
    UUID_PLACEHOLDER,
)

__all__ = ["scrub_text"]

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


# The last identities found and what they were found from (the environment
# and the user id): gathering them reads the password database and the host
# name, ~1 ms, and pack scrubs thousands of strings (issue 17).
_identities_seen: list = [None, None]


def _identities() -> tuple[tuple[str, str], ...]:
    # os.environ's raw mapping where CPython has one: iterating os.environ
    # itself decodes every variable, which cost more than the scrubbing.
    raw = getattr(os.environ, "_data", None)
    environ = tuple(raw.items()) if isinstance(raw, dict) else tuple(os.environ.items())
    key = (getattr(os, "getuid", lambda: None)(), environ)
    if _identities_seen[0] == key:
        return _identities_seen[1]
    found = _gather_identities()
    _identities_seen[:] = [key, found]
    return found


def _gather_identities() -> tuple[tuple[str, str], ...]:
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
    identities = _identities()
    # Short strings repeat (a record's dtype names, thousands of times): scrubbed
    # once while the identities they were scrubbed against stay the same.
    memo = _scrubbed_short if len(text) <= _SHORT_TEXT else None
    if memo is not None:
        if memo[0] is not identities:
            memo[:] = [identities, {}]
        done = memo[1].get(text)
        if done is not None:
            return done
    original = text
    regex, groups = _identity_regex(identities)
    if regex is not None:
        text = regex.sub(lambda match: groups[match.lastgroup or ""], text)
    for pattern, replacement in _FREE_TEXT_RULES:
        text = pattern.sub(replacement, text)
    if memo is not None and len(memo[1]) < 4096:
        memo[1][original] = text
    return text


_SHORT_TEXT = 64
_scrubbed_short: list = [None, {}]
