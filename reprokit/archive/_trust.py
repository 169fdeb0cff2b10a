"""`TrustPolicy`: what the maintainer lets an archive use, as one object.

Two decisions are the maintainer's alone and never read from an archive:
which of their own modules an archive may name (`--allow-module`), and
whether the code an archive bundles may be imported (`--trust-code`). They
always travel together, from the CLI (or `reprokit.load`'s keywords)
through load, replay, inspect, the sweep and every worker process, so they
are one frozen value, checked once when it is built: a module name that is
not one, or that no `--allow-module` may ever admit (`os`, `jax`, `pip`...),
is refused here with the allow-list's own rule.

Worker processes get the policy on their command line; `to_argv` and
`from_argv` are the one place that spells it there. This is the archive
layer: no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from reprokit.archive._allowlist import AllowList

_MODULE_FLAG = "--allow-module"
_TRUST_FLAG = "--trust-code"


@dataclasses.dataclass(frozen=True)
class TrustPolicy:
    """The maintainer's trust: modules an archive may name, and whether bundled code may run.

    Attributes:
      modules: the maintainer's own modules (and packages) whose classes and
        functions an archive may name, beside reprokit's allow-list.
      trust_code: import the reporter's code bundled in the archive
        (`pack --bundle-code`); it runs with the maintainer's permissions.
    """

    modules: tuple[str, ...] = ()
    trust_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "trust_code", bool(self.trust_code))
        AllowList(self.modules)  # the allow-list's rule for module names; raises RefusedTypeError

    @classmethod
    def of(cls, modules: Iterable[str] | None = (), trust_code: bool = False) -> TrustPolicy:
        """The policy for public keyword arguments (`allow_modules=`, `trust_code=`)."""
        return cls(tuple(modules or ()), trust_code)

    def allow_list(self, extra_modules: Sequence[str] = ()) -> AllowList:
        """The loader's allow-list: these modules plus `extra_modules` (e.g. admitted bundled ones)."""
        return AllowList(self.modules + tuple(m for m in extra_modules if m not in self.modules))

    def to_argv(self) -> list[str]:
        """The policy as a worker's command-line arguments (read back by `from_argv`)."""
        args: list[str] = []
        for module in self.modules:
            args += [_MODULE_FLAG, module]
        return args + ([_TRUST_FLAG] if self.trust_code else [])

    @classmethod
    def from_argv(cls, args: Sequence[str]) -> TrustPolicy:
        """The policy `to_argv` wrote; other arguments in `args` are ignored."""
        modules = tuple(
            args[i + 1] for i, arg in enumerate(args[:-1]) if arg == _MODULE_FLAG
        )
        return cls(modules, _TRUST_FLAG in args)
