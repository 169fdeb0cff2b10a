"""`--bundle-code`: ship the reporter's own layer code, and import it only when the maintainer trusts it.

The layers with the nastiest bugs are often the reporter's own classes,
which a maintainer cannot import. With `--bundle-code` (off by default),
`pack` copies the source files of exactly the modules the captured
structure names (not penzai, jax or numpy, not installed distributions,
nothing else of the project) into `code/` in the archive, each listed in
the manifest with its sha256. Classes and functions defined in a script
(`__main__`, or the target `reprokit pack` runs) have no file to copy: their
source is extracted with `inspect.getsource`, together with the imports and
module-level helpers they use, into one generated module named after the
script (`repro_main_<script>`), and the structure names them there.

Bundled code is code from a stranger, so the loader never imports it on its
own. `reprokit run` refuses (exit 3) and lists the bundled files unless the
maintainer passes `--trust-code` (after reading them with `reprokit
inspect`), or installs the modules and names them with `--allow-module`.
When trusted, a meta-path finder serves exactly the listed modules from the
archive's bytes (sha256 checked again); nothing is extracted to disk and no
other module can be served from the archive.
"""

from __future__ import annotations
import __future__

import builtins
import contextlib
import dataclasses
import hashlib
import importlib.abc
import importlib.util
import inspect
import linecache
import os
import re
import site
import symtable
import sys
import sysconfig
import textwrap
import types
from collections.abc import Iterator
from typing import Any

from reprokit._errors import CaptureError, RefusedTypeError, ReplayError
from reprokit.archive import _format
from reprokit.archive._code import (  # noqa: F401 (re-exported: the load-side checks live in the archive layer)
    CODE_PREFIX,
    NEVER_BUNDLED_ROOTS,
    bundled_modules,
    check_members,
    code_files,
    describe,
    member_names,
    verified_source,
)
from reprokit.archive._trust import TrustPolicy

# Modules a script's classes live in: run as a script, or loaded by `reprokit pack`.
MAIN_MODULES = ("__main__", "__reprokit_target__")


# ------------------------------------------------------------------ pack side


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What `--bundle-code` adds to an archive: members, modules, and the manifest section."""

    files: tuple[tuple[str, bytes], ...]
    modules: tuple[str, ...]
    aliases: dict[str, str]
    section: dict


def main_aliases() -> dict[str, str]:
    """The module each script module (`__main__`, the pack target) is bundled as."""
    aliases = {}
    for name in MAIN_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        file = getattr(module, "__file__", None)
        stem = os.path.splitext(os.path.basename(file))[0] if file else "notebook"
        stem = re.sub(r"[^0-9A-Za-z_]", "_", stem) or "script"
        aliases[name] = f"repro_main_{stem}"
    return aliases


def prepare(parts: dict, allow_modules: tuple[str, ...]) -> Bundle:
    """Finds the user modules `parts` names and builds their bundle (registering extracted ones).

    Raises:
      CaptureError: a needed class or helper cannot be bundled; the message says why.
    """
    from reprokit.record import _encoding, _names

    aliases = main_aliases()
    names: set[str] = set()
    for name, value in parts.items():
        _encoding.encode_tree(
            value,
            lambda array: 0,
            where=name,
            extra_modules=tuple(allow_modules),
            module_aliases=aliases,
            names_out=names,
        )
    referenced = _names.outside_defaults(names)
    originals = {alias: original for original, alias in aliases.items()}
    files: list[tuple[str, bytes]] = []
    entries: list[dict] = []
    skipped: list[dict] = []
    for module_name in sorted(referenced):
        if module_name in originals:
            source = _extract_main(sys.modules[originals[module_name]], referenced[module_name])
            _register(module_name, source, referenced[module_name])
            data = source.encode("utf-8")
            script = getattr(sys.modules[originals[module_name]], "__file__", None)
            origin = (
                f"extracted from the script {os.path.basename(script) if script else '(notebook)'}"
            )
        else:
            module = sys.modules.get(module_name)
            file = getattr(module, "__file__", None)
            why = _not_bundled_reason(module_name, file)
            if why:
                skipped.append({"module": module_name, "reason": why})
                continue
            with open(file, "rb") as handle:
                data = handle.read()
            # verify refuses code members with control or bidi characters
            # (they can make source display otherwise than it runs).
            problem = _format.text_problem(data.decode("utf-8", "replace"))
            if problem is not None:
                skipped.append({"module": module_name, "reason": f"its source {problem}"})
                continue
            origin = f"module file {os.path.basename(file)}"
        is_package = module_name not in originals and hasattr(sys.modules[module_name], "__path__")
        path = (
            CODE_PREFIX + module_name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
        )
        files.append((path, data))
        entries.append(
            {
                "path": path,
                "module": module_name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "source": origin,
            }
        )
    section = {"files": entries, "not_bundled": skipped}
    return Bundle(
        files=tuple(files),
        modules=tuple(e["module"] for e in entries),
        aliases=aliases,
        section=section,
    )


def _not_bundled_reason(module_name: str, file: str | None) -> str | None:
    if module_name.split(".")[0] in NEVER_BUNDLED_ROOTS:
        return "a library reprokit depends on"
    if not file or not file.endswith(".py") or not os.path.isfile(file):
        return "no Python source file to copy"
    if _is_installed_path(file):
        return "an installed distribution: the maintainer installs it and passes --allow-module"
    return None


def _is_installed_path(path: str) -> bool:
    """Whether `path` lies in site-packages or the standard library (not the user's own code)."""
    roots = {sysconfig.get_paths().get(key) for key in ("purelib", "platlib", "stdlib")}
    roots |= set(getattr(site, "getsitepackages", lambda: [])())
    roots.add(site.getusersitepackages())
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(root) + os.sep) for root in filter(None, roots))


def _installed_location(root: str) -> str | None:
    """Where an installed top-level module `root` lives here, found without importing it."""
    import importlib.machinery

    try:
        spec = importlib.machinery.PathFinder.find_spec(root)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    places = [spec.origin, *(spec.submodule_search_locations or [])]
    return next((p for p in places if isinstance(p, str) and _is_installed_path(p)), None)


def _free_globals(source: str) -> set[str]:
    """Names `source` reads from its module's globals (not locals, not its own definitions)."""
    top = symtable.symtable(source, "<extracted>", "exec")
    names: set[str] = set()
    stack = [top]
    while stack:
        table = stack.pop()
        kind = table.get_type()
        for symbol in table.get_symbols():
            if not symbol.is_referenced():
                continue
            if kind == "module" or kind == "class" and not symbol.is_assigned():
                names.add(symbol.get_name())
            elif kind == "function" and symbol.is_global():
                names.add(symbol.get_name())
        stack.extend(table.get_children())
    return names


def _is_literal(value: Any) -> bool:
    if value is None or type(value) in (bool, int, float, str, bytes, complex):
        return True
    if type(value) in (tuple, frozenset):
        return all(_is_literal(v) for v in value)
    return False


def _extract_main(module: types.ModuleType, qualnames: set[str]) -> str:
    """Source for a module holding the script's classes/functions in `qualnames` and what they use."""
    namespace = vars(module)
    script = os.path.basename(getattr(module, "__file__", None) or "(notebook)")
    queue = sorted({q.split(".")[0] for q in qualnames})
    done: set[str] = set()
    definitions: list[tuple[int, str]] = []
    imports: dict[str, str] = {}
    constants: dict[str, str] = {}
    while queue:
        name = queue.pop(0)
        if name in done:
            continue
        done.add(name)
        if name not in namespace:
            continue  # a builtin, or a name set later at run time (replay will say)
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            imports[name] = (
                f"import {value.__name__}"
                if value.__name__ == name
                else f"import {value.__name__} as {name}"
            )
        elif isinstance(value, (type, types.FunctionType)) and value.__module__ == module.__name__:
            try:
                lines, first = inspect.getsourcelines(value)
            except (OSError, TypeError) as error:
                raise CaptureError(
                    f"--bundle-code: cannot read the source of {name} in {script} ({error}); "
                    "move it into a module file"
                ) from None
            source = textwrap.dedent("".join(lines))
            definitions.append((first, source))
            queue.extend(sorted(_free_globals(source) - done))
        elif _is_literal(value):
            # A constant the code reads (`__file__`, a data folder) may hold the
            # reporter's paths or names: scrubbed like every stored string.
            constants[name] = f"{name} = {_scrubbed_literal(value)!r}"
        elif getattr(builtins, name, None) is value:
            continue
        else:
            owner = getattr(value, "__module__", None)
            qualname = getattr(value, "__qualname__", None)
            home = sys.modules.get(owner) if isinstance(owner, str) else None
            if (
                home is None
                or owner in MAIN_MODULES
                or not isinstance(qualname, str)
                or "." in qualname
                or getattr(home, qualname, None) is not value
            ):
                raise CaptureError(
                    f"--bundle-code: the layer's code in {script} uses the global {name!r} "
                    f"(a {type(value).__name__}), which cannot be written as source; move the "
                    "layer into a module file"
                )
            alias = "" if qualname == name else f" as {name}"
            imports[name] = f"from {owner} import {qualname}{alias}"
    future = namespace.get("annotations") is __future__.annotations
    parts = [
        f'"""Extracted by reprokit --bundle-code from {script}: the classes and functions the '
        'packed layer needs."""',
        *(["from __future__ import annotations"] if future else []),
        "",
        *sorted(imports.values()),
        "",
        *[constants[k] for k in sorted(constants)],
        "",
        *[source for _, source in sorted(definitions)],
    ]
    return "\n".join(parts).strip() + "\n"


def _scrubbed_literal(value: Any) -> Any:
    """A literal constant with its strings scrubbed (SECURITY.md, class 5)."""
    from reprokit.environment._scrub import scrub_text

    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_scrubbed_literal(item) for item in value)
    if isinstance(value, dict):
        return {_scrubbed_literal(k): _scrubbed_literal(v) for k, v in value.items()}
    return value


def _register(alias: str, source: str, qualnames: set[str]) -> None:
    """Runs the extracted module (the reporter's own code, in their process) so packing can check it."""
    module = types.ModuleType(alias)
    module.__file__ = f"<reprokit bundle {alias}>"
    previous = sys.modules.get(alias)
    # Registered first, as an import would: dataclasses look their module up.
    sys.modules[alias] = module
    try:
        # The reporter's own code, run in the reporter's own process.
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        for qualname in qualnames:
            obj = module
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                raise AttributeError(f"it lacks {qualname}")
    except Exception as error:
        if previous is None:
            del sys.modules[alias]
        else:
            sys.modules[alias] = previous
        raise CaptureError(
            f"--bundle-code: the source extracted for {alias} does not run "
            f"({type(error).__name__}: {error}); move the layer into a module file"
        ) from None


# ------------------------------------------------------------------ load side


@contextlib.contextmanager
def admitted(opened: Any, trust: TrustPolicy) -> Iterator[tuple[str, ...]]:
    """`admit` under the maintainer's `trust`, with the bundle's finder removed again on exit.

    Modules imported inside the block stay imported; the finder does not
    outlive the load, so a later import of the same name (say, the
    maintainer's fixed copy) is not served from this archive.
    """
    before = list(sys.meta_path)
    try:
        yield admit(opened, trust.modules, trust.trust_code)
    finally:
        sys.meta_path[:] = [
            f for f in sys.meta_path if f in before or not isinstance(f, _BundleFinder)
        ]


def admit(opened: Any, allow_modules: tuple[str, ...], trust_code: bool) -> tuple[str, ...]:
    """The modules the loader may import for this archive; installs the bundle when trusted.

    Raises:
      RefusedTypeError: the record needs bundled modules, and the maintainer
        neither passed `--trust-code` nor allowed installed copies of them.
    """
    files = code_files(opened.manifest)
    if not files:
        return tuple(allow_modules)
    allow = tuple(allow_modules)

    def allowed(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in allow)

    if trust_code:
        _install(opened, files)
        return allow + tuple(entry["module"] for entry in files)
    needed = set(opened.manifest.get("modules", []))
    missing = [e for e in files if e["module"] in needed and not allowed(e["module"])]
    if missing:
        listed = ", ".join(f"{e['path']} ({e['module']})" for e in missing)
        raise RefusedTypeError(
            f"the layer needs the reporter's bundled code: {listed}; reprokit imports bundled "
            "code only with --trust-code, so read it first (reprokit inspect ARCHIVE lists it; "
            "unzip -p ARCHIVE PATH shows it), then rerun with --trust-code, or install those "
            "modules yourself and pass --allow-module for each"
        )
    return allow


class _BundleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves exactly the bundled modules of one archive from their verified bytes."""

    def __init__(self, archive: str, sources: dict[str, tuple[str, bytes, bool]]):
        self._archive = archive
        self._sources = sources
        # Parent packages of a bundled submodule that the archive does not
        # bundle are served empty, so `a.b` imports without running `a`.
        self._implicit = {
            ".".join(name.split(".")[:i]) for name in sources for i in range(1, name.count(".") + 1)
        } - set(sources)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self._sources:
            member, _, is_package = self._sources[fullname]
            origin = f"{self._archive}/{member}"
            return importlib.util.spec_from_loader(
                fullname, self, origin=origin, is_package=is_package
            )
        if fullname in self._implicit:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        entry = self._sources.get(module.__name__)
        if entry is None:
            return  # an implicit parent package: empty
        member, data, _ = entry
        filename = f"{self._archive}/{member}"
        text = data.decode("utf-8")
        # Tracebacks and inspect.getsource then show the bundled lines.
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        module.__file__ = filename
        # Reached only with --trust-code: `admit` installs this finder then, never otherwise.
        exec(compile(text, filename, "exec"), module.__dict__)

    def names(self) -> set[str]:
        return set(self._sources)

    def serves(self, name: str, sha256: str) -> bool:
        entry = self._sources.get(name)
        return entry is not None and hashlib.sha256(entry[1]).hexdigest() == sha256


def _install(opened: Any, files: list[dict]) -> None:
    sources: dict[str, tuple[str, bytes, bool]] = {}
    for entry in files:
        # Served first, a bundled module would shadow a library installed here
        # (say `scipy`, which jax imports later): only the reporter's own names.
        installed = _installed_location(entry["module"].split(".")[0])
        if installed is not None:
            raise RefusedTypeError(
                f"archive bundles module {entry['module']!r}, which is installed here "
                f"({installed}); bundled code may not replace installed libraries"
            )
        data = verified_source(opened.reader, entry)
        module = sys.modules.get(entry["module"])
        if module is not None and not _same_code(module, entry):
            raise ReplayError(
                f"module {entry['module']} is already imported in this process and differs from "
                f"the bundled {entry['path']}; replay in a fresh process (reprokit run)"
            )
        sources[entry["module"]] = (entry["path"], data, entry["path"].endswith("/__init__.py"))
    # One finder per module name: a later trusted archive replaces an earlier one's.
    sys.meta_path[:] = [
        finder
        for finder in sys.meta_path
        if not (isinstance(finder, _BundleFinder) and finder.names() & sources.keys())
    ]
    sys.meta_path.insert(0, _BundleFinder(os.path.abspath(opened.path), sources))


def _same_code(module: types.ModuleType, entry: dict) -> bool:
    loader = getattr(getattr(module, "__spec__", None), "loader", None)
    if isinstance(loader, _BundleFinder):
        return loader.serves(entry["module"], entry["sha256"])
    file = getattr(module, "__file__", None)
    try:
        with open(file, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest() == entry["sha256"]
    except (OSError, TypeError):
        return False
