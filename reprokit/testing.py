"""Regression tests from archives: a bug's archive stays in the test suite until it is fixed.

A maintainer who receives an archive keeps it as a test: `assert_fixed`
fails, showing reprokit's verdict, for as long as the recorded issue still
reproduces, and passes once the fix lands. `assert_reproduces` is the
opposite check, for a test that pins down a bug before fixing it. The
pytest plugin (`reprokit._pytest_plugin`) runs every `*.repro.zip` in a
configured folder through `assert_fixed`.

The replay runs in this process, so the code under test is the code the test
session imports (the maintainer's fix). Loading an archive applies its
recorded jax configuration (x64, matmul precision, ...); these checks put
the configuration back afterwards, so one archive cannot change the numerics
of the tests that run after it. Recorded XLA flags cannot be applied to a
running jax; the verdict's notes say so (`reprokit run` applies them).

An archive that is invalid, refused, or cannot be replayed here raises its
`ReprokitError`: it never counts as fixed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from reprokit.environment._config import restored_jax_config

if TYPE_CHECKING:
    from reprokit.replaying._replay import Verdict

__all__ = ["assert_fixed", "assert_reproduces", "replay_isolated"]


def replay_isolated(
    path: str | os.PathLike, allow_modules: tuple[str, ...] | list[str] = ()
) -> Verdict:
    """Replays `path` in this process and restores the jax configuration afterwards.

    Args:
      path: a `.repro.zip` archive.
      allow_modules: modules, besides reprokit's allow-list, whose classes and
        functions the archive may name (as `reprokit run --allow-module`).

    Returns:
      The `Verdict` of the replay.

    Raises:
      ReprokitError: the archive is invalid or refused (`ArchiveError`), or
        cannot be replayed here (`ReplayError`).
    """
    from reprokit.replaying._replay import replay

    with restored_jax_config():
        return replay(path, allow_modules=tuple(allow_modules))


def assert_reproduces(
    path: str | os.PathLike, allow_modules: tuple[str, ...] | list[str] = ()
) -> Verdict:
    """Asserts that the issue recorded in `path` reproduces here; returns the verdict.

    Raises:
      AssertionError: the issue did not reproduce; the message is the
        formatted verdict (what was measured, and how the environment differs).
      ReprokitError: the archive is invalid, refused or cannot be replayed here.
    """
    verdict = replay_isolated(path, allow_modules)
    if not verdict.reproduced:
        raise AssertionError(
            f"{os.fspath(path)}: expected the recorded issue to reproduce\n{verdict.format()}"
        )
    return verdict


def assert_fixed(
    path: str | os.PathLike, allow_modules: tuple[str, ...] | list[str] = ()
) -> Verdict:
    """Asserts that the issue recorded in `path` no longer reproduces; returns the verdict.

    Raises:
      AssertionError: the issue still reproduces; the message is the
        formatted verdict.
      ReprokitError: the archive is invalid, refused or cannot be replayed
        here; an archive that cannot be replayed does not count as fixed.
    """
    verdict = replay_isolated(path, allow_modules)
    if verdict.reproduced:
        raise AssertionError(
            f"{os.fspath(path)}: the recorded issue still reproduces\n{verdict.format()}"
        )
    return verdict
