"""The architecture's rules, read from the import graph of the source.

The README's "Architecture" section says which part may import which. These
tests read every `import` in `reprokit/` with `ast` (imports inside
functions count too: a lazy import is still a dependency) and fail when a
rule is broken, so the layering cannot erode one convenient import at a time.
"""

from __future__ import annotations

import ast
import collections
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_reprokit, subprocess_env

PACKAGE = REPO / "reprokit"
STDLIB = frozenset(sys.stdlib_module_names)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names (`from a import b` gives a.b or a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; reprokit uses absolute imports"
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}")
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path):
            if imported.split(".")[0] != "reprokit":
                deps.add(imported)
            elif imported in modules and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


GRAPH = _graph()


def _part(module: str) -> str:
    """`reprokit.archive._open` -> `archive`; top-level modules are their own part."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return module


def _in(part: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if _part(m) == part}


def test_the_layout_has_the_pipeline_subpackages():
    for part in ("archive", "portable", "record", "environment", "capture", "replaying", "views"):
        assert (PACKAGE / part / "__init__.py").is_file(), part
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text()))
        assert doc and "Rule" in doc, f"reprokit/{part}/__init__.py must state its rule"
    flat = [p.name for p in PACKAGE.glob("*.py")]
    assert len(flat) <= 10, f"reprokit/ has {len(flat)} flat modules again: {sorted(flat)}"


def test_every_module_says_why_it_exists():
    missing = [
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*.py")
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, missing


def test_archive_layer_imports_only_bytes_and_plain_data():
    allowed_third_party = {"numpy", "ml_dtypes", "msgpack"}
    for module, deps in _in("archive").items():
        for dep in deps:
            root = dep.split(".")[0]
            if root == "reprokit":
                assert _part(dep) == "archive" or dep == "reprokit._errors", (module, dep)
            else:
                assert root in STDLIB or root in allowed_third_party, (module, dep)


def test_loader_side_never_imports_capture_cli_or_templates():
    for part in ("replaying", "record", "environment", "portable", "archive"):
        for module, deps in _in(part).items():
            for dep in deps:
                assert _part(dep) != "capture", (module, dep)
                assert dep != "reprokit._cli", (module, dep)
                assert dep.split(".")[0] != "jinja2", (module, dep)
                assert dep != "reprokit.views._script", (module, dep)


def test_nothing_but_the_entry_points_imports_the_cli():
    for module, deps in GRAPH.items():
        if "reprokit._cli" in deps:
            assert module in ("reprokit.__main__",), module


def test_portable_code_imports_no_reprokit_once_embedded():
    from reprokit.views._script import embedded_sources

    for source in embedded_sources():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "reprokit" for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "reprokit", node.module
    for module, deps in _in("portable").items():
        for dep in deps:
            # Inside reprokit the portable modules may import each other and the
            # archive's descriptor checks: those files are embedded beside them.
            assert dep.split(".")[0] != "reprokit" or _part(dep) in ("portable", "archive"), (
                module,
                dep,
            )
            if dep.split(".")[0] == "reprokit" and _part(dep) == "archive":
                assert dep == "reprokit.archive._descriptors", (module, dep)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_subpackages():
    parts: dict[str, set[str]] = collections.defaultdict(set)
    for module, deps in GRAPH.items():
        for dep in deps:
            if dep.split(".")[0] == "reprokit" and _part(dep) != _part(module):
                parts[_part(module)].add(_part(dep))
    # The package root only re-exports, lazily; it is the top, not a layer.
    parts.pop("reprokit", None)
    for deps in parts.values():
        deps.discard("reprokit")
    assert _cycles(dict(parts)) == []


def test_no_import_cycle_between_modules():
    graph = {m: {d for d in deps if d in GRAPH} for m, deps in GRAPH.items() if m != "reprokit"}
    assert _cycles(graph) == []


def test_one_node_grammar():
    from reprokit.archive._grammar import NODE_KEYS
    from reprokit.record import _encoding

    assert set(_encoding._HANDLERS) == set(NODE_KEYS)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("arch")
    code = (
        "import jax.numpy as jnp, reprokit\n"
        "from penzai import pz\n"
        "layer = pz.nn.Elementwise(jnp.log)\n"
        "model = pz.nn.Sequential([layer])\n"
        "sel = pz.select(model).at_instances_of(pz.nn.Elementwise)\n"
        "x = pz.nx.wrap(jnp.array([-1.0, 2.0])).tag('f')\n"
        f"reprokit.pack(sel, x, out={str(folder / 'small.repro.zip')!r}, check=False)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "small.repro.zip"


def test_verify_loads_no_machine_learning_code(small_archive):
    """`python -X importtime -m reprokit verify` imports no jax, penzai, orbax, jinja2 or treescope.

    verify still says whether replay.py is what this reprokit renders (SECURITY.md,
    class 2): the rendering runs in an isolated child fed the parsed record.
    """
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reprokit", "verify", str(small_archive)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    roots = {name.split(".")[0] for name in imported}
    for heavy in ("jax", "jaxlib", "penzai", "orbax", "jinja2", "treescope"):
        assert heavy not in roots, heavy
    for name in imported:
        assert not name.startswith(("reprokit.replaying", "reprokit.capture")), name


def test_verify_json_still_works_from_the_cli(small_archive):
    result = run_reprokit("verify", small_archive, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True
    # Rendered in an isolated child from the parsed record: pack rendered the same bytes.
    assert report["replay_script"] == "identical"


def test_readme_architecture_lists_every_module():
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Architecture\n")
    block = readme[start : readme.index("\n## ", start + 5)]
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 2:
            assert f"{relative.parts[0]}/" in block, relative
        if path.name != "__init__.py" or len(relative.parts) == 1:
            assert f" {path.name} " in block, f"README's Architecture does not list {relative}"


def test_every_import_statement_is_found_wherever_it_is_nested():
    """`_statements` (which finds the imports replay.py drops) misses no nesting."""
    from reprokit.views._script import _statements

    source = textwrap.dedent(
        """
        import a
        def f():
            import b
            class C:
                from c import x
            for _ in ():
                pass
            else:
                import d
        try:
            import e
        except ImportError:
            import f
        else:
            import g
        finally:
            import h
        with open("x") as handle:
            if True:
                import i
            elif False:
                import j
        while False:
            import k
        match 1:
            case 1:
                import l
        """
    )
    tree = ast.parse(source)
    found = {node.lineno for node in _statements(tree) if isinstance(node, (ast.Import, ast.ImportFrom))}
    every = {node.lineno for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))}
    assert found == every and len(every) == 12
