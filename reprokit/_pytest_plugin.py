"""A pytest plugin that turns archives into regression tests.

A maintainer drops a bug's `.repro.zip` into a folder named in the pytest
configuration::

    [tool.pytest.ini_options]
    reprokit_regressions = ["tests/regressions"]
    reprokit_allow_modules = ["mypackage.layers"]   # only if archives need your modules

and every `*.repro.zip` in (or below) it becomes one test item that fails
while the recorded issue reproduces and passes once it no longer does: the
bug's own report is its regression test. Items carry the `reprokit` marker
(`-m "not reprokit"` skips them).

The plugin is registered through the `pytest11` entry point, so it loads in
every pytest session where reprokit is installed; it therefore imports
nothing heavy at start-up and collects nothing unless `reprokit_regressions`
is set. Modules are allowed only through `reprokit_allow_modules`, never
from what an archive asks for, exactly as `reprokit run` needs
`--allow-module`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

_FOLDERS = "reprokit_regressions"
_MODULES = "reprokit_allow_modules"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declares the plugin's ini options."""
    parser.addini(
        _FOLDERS,
        type="paths",
        default=[],
        help="reprokit: folders whose *.repro.zip archives are regression tests "
        "(each fails while its recorded issue reproduces)",
    )
    parser.addini(
        _MODULES,
        type="linelist",
        default=[],
        help="reprokit: your modules that regression archives may rebuild classes "
        "and functions from (as reprokit run --allow-module)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Registers the marker carried by regression items."""
    config.addinivalue_line("markers", "reprokit: a reprokit archive replayed as a regression test")


def _in_folders(path: Path, folders: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(folder).resolve()) for folder in folders)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collects `*.repro.zip` files inside the configured folders."""
    if not file_path.name.endswith(".repro.zip"):
        return None
    folders = parent.config.getini(_FOLDERS)
    if not folders or not _in_folders(file_path, folders):
        return None
    return ReproArchive.from_parent(parent, path=file_path)


class ReproArchive(pytest.File):
    """One archive file; it holds a single item."""

    def collect(self):
        """Yields the archive's one regression item."""
        yield RegressionItem.from_parent(self, name="fixed")


class _StillReproduces(Exception):
    def __init__(self, verdict: Any):
        super().__init__("the recorded issue still reproduces")
        self.verdict = verdict


class RegressionItem(pytest.Item):
    """Replays the archive; fails while its recorded issue reproduces."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_marker("reprokit")

    def runtest(self) -> None:
        """Replays in this process (the code under test), restoring jax config afterwards."""
        from reprokit.testing import replay_isolated

        modules = tuple(self.config.getini(_MODULES))
        verdict = replay_isolated(self.path, allow_modules=modules)
        if verdict.reproduced:
            raise _StillReproduces(verdict)  # repr_failure shows the verdict
        # Shown with -rA: what was measured, e.g. environment notes.
        self.add_report_section("call", "reprokit verdict", verdict.format())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        """The verdict, or reprokit's one-line error, instead of a traceback into reprokit."""
        from reprokit._errors import RefusedTypeError, ReprokitError

        error = excinfo.value
        if isinstance(error, _StillReproduces):
            return (
                f"{self.path.name}: the recorded issue still reproduces (not fixed yet)\n"
                + error.verdict.format()
            )
        if isinstance(error, RefusedTypeError):
            return (
                f"reprokit: error: {error}\n"
                f"(in pytest, allow your modules with the ini option {_MODULES})"
            )
        if isinstance(error, ReprokitError):
            return f"reprokit: error: {error}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, None, str]:
        """Where the item comes from, for pytest's report headers."""
        return self.path, None, f"reprokit regression {self.path.name}"
