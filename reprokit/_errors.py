"""Errors that reprokit reports to users, each tied to one CLI exit code.

Every failure a user can hit surfaces as a subclass of `ReprokitError` whose
message is one line saying what went wrong and what to do. The CLI prints
that line and exits with the class's `exit_code`, so scripts (and CI jobs
triaging archives) can tell a refused archive from a bug that did not
reproduce without parsing text.
"""

from __future__ import annotations

EXIT_REPRODUCED = 0
EXIT_NOT_REPRODUCED = 1
EXIT_USAGE = 2
EXIT_INVALID_ARCHIVE = 3
EXIT_PACK_FAILED = 4
EXIT_REPLAY_FAILED = 5


class ReprokitError(Exception):
    """Base class of every error reprokit reports to a user."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str):
        # One line, always: the CLI prints it as-is.
        super().__init__(" ".join(str(message).split()))


class UsageError(ReprokitError):
    """The user asked for something that cannot work (bad target, selection)."""

    exit_code = EXIT_USAGE


class ArchiveError(ReprokitError):
    """The archive is malformed, truncated, tampered with or refused."""

    exit_code = EXIT_INVALID_ARCHIVE


class RefusedTypeError(ArchiveError):
    """The archive names a type or callable outside the loader's allow-list."""


class CaptureError(ReprokitError):
    """Packing failed: nothing could be captured, or a value cannot be saved."""

    exit_code = EXIT_PACK_FAILED


class ReplayError(ReprokitError):
    """The archive is valid but this machine cannot replay it."""

    exit_code = EXIT_REPLAY_FAILED
