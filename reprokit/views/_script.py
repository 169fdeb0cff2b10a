"""Generation of the archive's human-facing members: replay.py, README.md, requirements.txt.

`replay.py` lets a maintainer replay an archive with no reprokit installed,
and read or edit the layer as ordinary Python. It is rendered from the same
encoded structure the loader decodes, so both rebuild the same objects, and
it embeds reprokit's own array, calling and verdict modules verbatim, so it
computes and judges exactly as `reprokit run` does.

Templates are jinja2 files in the top-level `templates/` folder, shipped
inside the wheel as `reprokit/templates/`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from reprokit.archive import _format
from reprokit.archive._collector import collector_paused
from reprokit.archive._grammar import TAG

# The library code embedded into every replay.py, in dependency order: the
# descriptor checks (archive layer, no jax), then the portable package.
EMBEDDED_MODULES = (
    "archive/_descriptors.py",
    "portable/_arrays.py",
    "portable/_verdict.py",
    "portable/_calling.py",
    "portable/_gradients.py",
    "portable/_jax_config.py",
)
_INDENT = "    "
_INLINE_WIDTH = 88


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a new temp file beside it, then rename it into place.

    The temp file gets an unguessable name and is created with
    `O_CREAT|O_EXCL|O_NOFOLLOW` (SECURITY.md, class 8): a symlink planted
    where it would go (say pointing at ~/.bashrc) makes the open fail instead
    of being followed, and the rename replaces a link at `path` itself, never
    its target. Raises OSError; no temp file is left behind.
    """
    import secrets

    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    temp = os.path.join(folder, f".{base}.tmp-{secrets.token_hex(8)}")
    fd = os.open(temp, flags | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def templates_dir() -> Path:
    """Where the jinja2 templates are: inside the installed package, or the source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / "replay.py.j2").is_file():
            return candidate
    raise FileNotFoundError("reprokit's templates are missing; reinstall reprokit")


@functools.cache
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=False,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pyrepr"] = repr
    env.filters["comment"] = lambda text: "\n".join(
        "# " + line for line in str(text).splitlines() or [""]
    )
    env.filters["human_bytes"] = _format.human_bytes
    # Archive text inside a Markdown fence it cannot close (SECURITY.md, class 7).
    env.filters["markdown_fence"] = _format.markdown_fence
    env.filters["describe_signature"] = _format.describe_signature
    return env


@functools.cache  # parsed once per process: also keeps `ast.parse` out of every render
def _embedded_source(relative: str) -> str:
    """A module's source for `replay.py`: its imports of reprokit dropped, one shared namespace.

    The embedded modules import each other by package path inside reprokit;
    in the script they sit side by side, so those imports (and `from
    __future__`) are removed by parsing, not by pattern, wherever they are.
    """
    text = (Path(__file__).resolve().parents[1] / relative).read_text()
    dropped: set[int] = set()
    for node in _statements(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (
            node.module == "__future__" or (node.module or "").split(".")[0] == "reprokit"
        ):
            dropped.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, ast.Import) and any(
            alias.name.split(".")[0] == "reprokit" for alias in node.names
        ):
            dropped.update(range(node.lineno, node.end_lineno + 1))
    lines = [line for number, line in enumerate(text.splitlines(), 1) if number not in dropped]
    return f"# ---- embedded from reprokit/{relative} ----\n" + "\n".join(lines).strip() + "\n"


def _statements(tree: ast.Module) -> Iterator[ast.stmt]:
    """Every statement of a module, nested ones included, and none of its expressions.

    An import is always a statement: walking only statement lists finds every
    one of them without visiting the expressions (most of a module's nodes).
    """
    stack: list[Any] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        for field in ("body", "orelse", "finalbody"):
            stack.extend(getattr(node, field, None) or ())
        for field in ("handlers", "cases"):  # except clauses, match cases
            for holder in getattr(node, field, None) or ():
                stack.extend(holder.body)


def embedded_sources() -> list[str]:
    """The library code `replay.py` carries, in dependency order."""
    return [_embedded_source(relative) for relative in EMBEDDED_MODULES]


def render_replay_script(manifest: dict, tree: dict) -> str:
    """The standalone replay script for an archive's manifest and encoded structure.

    The manifest is taken as it reads back from the archive (JSON, keys
    sorted), so that pack renders byte for byte what `verify` renders later.
    """
    import json

    manifest = json.loads(json.dumps(manifest, sort_keys=True))
    writer = _PythonWriter(tree["arrays"])
    with collector_paused():
        parts = {name: writer.expression(node, 1) for name, node in tree["record"].items()}
        return (
            _environment()
            .get_template("replay.py.j2")
            .render(
                manifest=manifest,
                signature=manifest["signature"],
                mode=manifest["mode"],
                jax_config=_replayed_config(manifest["environment"].get("jax_config", {})),
                arrays=tree["arrays"],
                parts=parts,
                imports=sorted(writer.imports),
                # What `needs_flax(tree)` says, from the names the writer wrote: one walk, not two.
                needs_flax=writer.names_flax,
                flax_message=_flax_message(manifest),
                embedded=embedded_sources(),
            )
        )


def replay_script_status(opened: Any, *, isolated: bool = False) -> str:
    """Whether an opened archive's replay.py is what this reprokit renders from its record.

    "identical", "differs", "absent", or (isolated only) "unchecked" when the
    rendering child did not answer. replay.py is the one member a
    maintainer may run by hand; an archive whose script differs from what
    the record renders to (hand-edited, or from another reprokit version)
    must be read before it is run (SECURITY.md, class 2). Imports no jax.

    With `isolated`, the rendering runs in a child interpreter (`python -I`)
    that gets the already-parsed manifest and structure on its standard
    input and answers with the script's sha256: `verify` uses it so that its
    own process loads no template engine, and the archive is still read once.
    """
    if _format.REPLAY_SCRIPT not in opened.reader:
        return "absent"
    data = opened.reader.read_bytes(_format.REPLAY_SCRIPT)
    if isolated:
        return _isolated_status(opened, hashlib.sha256(data).hexdigest())
    try:
        rendered = render_replay_script(opened.manifest, opened.structure).encode()
    except Exception:  # a record this version cannot render: the script is not ours
        return "differs"
    return "identical" if rendered == data else "differs"


def _isolated_status(opened: Any, sha256: str) -> str:
    from reprokit._workers import WorkerFailed, run_worker
    from reprokit.archive._grammar import pack_bytes

    request = pack_bytes({"manifest": opened.manifest, "structure": opened.structure})
    try:
        answer = run_worker("reprokit.views._script", [], env=None, timeout=120, input=request)
    except WorkerFailed:
        # The child could not answer (killed, timed out): say so, never guess.
        return "unchecked"
    return "identical" if answer.get("sha256") == sha256 else "differs"


def _render_main() -> int:
    """`python -m reprokit.views._script` < msgpack{manifest, structure}: the rendered script's sha256."""
    import json
    import sys

    from reprokit.archive._grammar import unpack_bytes

    try:
        request = unpack_bytes(sys.stdin.buffer.read())
        script = render_replay_script(request["manifest"], request["structure"]).encode()
        answer = {"sha256": hashlib.sha256(script).hexdigest()}
    except Exception:  # a record this version cannot render: the script is not ours
        answer = {"sha256": None}
    print(json.dumps(answer))
    return 0


def replay_script_line(status: str) -> str | None:
    """The line `verify`, `inspect` and `run` print about replay.py (None when there is none)."""
    version = _format.reprokit_version()
    if status == "identical":
        return f"replay.py is byte-identical to what reprokit {version} renders from the record"
    if status == "differs":
        return (
            f"replay.py in this archive differs from what reprokit {version} renders: "
            "read it before running it"
        )
    if status == "unchecked":
        return (
            f"replay.py could not be compared with what reprokit {version} renders "
            "(the rendering process did not answer): read it before running it"
        )
    return None


def _replayed_config(recorded: dict) -> dict:
    """The recorded jax config `replay.py` carries: what `apply_jax_config` applies or reports.

    Machine settings are left out (never applied, never reported); the script
    hands the rest to the embedded `apply_jax_config`, as `reprokit run` does.
    """
    from reprokit.portable._jax_config import restorable_config_items, unreviewed_config_items

    return {**restorable_config_items(recorded), **unreviewed_config_items(recorded)}


def render_readme(manifest: dict) -> str:
    """The archive's README.md: what was recorded and how to replay it."""
    from reprokit.environment._diff import format_environment_summary

    return (
        _environment()
        .get_template("README.md.j2")
        .render(
            manifest=manifest,
            environment_summary=format_environment_summary(manifest["environment"]),
        )
    )


def render_issue_text(**context: Any) -> str:
    """The GitHub issue snippet (templates/issue.md.j2); `reprokit.views._issue` builds the context."""
    return _environment().get_template("issue.md.j2").render(**context)


def _flax_message(manifest: dict) -> str:
    version = manifest["environment"].get("packages", {}).get("flax")
    if not (isinstance(version, str) and re.fullmatch(r"[0-9A-Za-z.+!-]{1,40}", version)):
        version = None
    wanted = f"flax {version}" if version else "flax"
    pin = f"flax=={version}" if version else "flax"
    return f"this archive needs {wanted}, which is not installed here: pip install {pin!r}"


_FLAX_NAMES = ("flax.", "penzai.toolshed.unflaxify:")


def needs_flax(tree: dict) -> bool:
    """Whether an encoded structure names Flax (or penzai's Flax bridge), so replaying needs flax."""
    from reprokit.archive._grammar import named

    return names_need_flax(name for part in tree["record"].values() for name in named(part))


def names_need_flax(names: Iterable[str]) -> bool:
    """Whether any of these class and function names is Flax's (or penzai's Flax bridge)."""
    return any(name.startswith(_FLAX_NAMES) for name in names)


def render_requirements(manifest: dict, *, flax: bool = False) -> str:
    """Pinned versions of what `replay.py` needs, as recorded (and flax, when the record names it)."""
    packages = manifest["environment"].get("packages", {})
    lines = [
        f"{name}=={packages[name]}"
        for name in ("jax", "jaxlib", "penzai", "numpy", "ml_dtypes")
        if packages.get(name)
    ]
    if flax:
        lines.append(f"flax=={packages['flax']}" if packages.get("flax") else "flax")
    if (manifest.get("multiprocess") or {}).get("checkpoint"):
        lines.append("tensorstore")  # reads the multi-process capture's checkpoint/
    return "\n".join(lines) + "\n"


class _PythonWriter:
    """Writes an encoded tree as a readable Python expression."""

    def __init__(self, arrays: list[dict]):
        self._arrays = arrays
        self.imports: set[str] = set()
        self._comments: dict[int, str] = {}  # an array's comment, by index
        self._names: dict[str, str] = {}  # a written class or function name, by its encoded name
        # Whether a name written names Flax: the writer writes every name
        # `_grammar.named` finds, so this is `needs_flax` of what it wrote.
        self.names_flax = False

    def expression(self, node: Any, level: int) -> str:
        return self._emit(node, level)

    def _emit(self, node: Any, level: int) -> str:
        # Exact types first, the nodes of a big record most often first: a
        # NamedArray is an obj node, a str, an odict and an array node.
        kind = type(node)
        if kind is dict:
            tag = node[TAG]
            if tag == "array":
                return f"array({node['i']})"
            if tag == "obj":
                return self._obj(node, level)
        elif kind is str or kind is int:
            return repr(node)
        return self._emit_any(node, level)

    def _emit_any(self, node: Any, level: int) -> str:
        if isinstance(node, float):
            return _float(node)
        if node is None or isinstance(node, (bool, int, str, bytes)):
            return repr(node)
        if isinstance(node, list):
            return self._sequence("[", "]", self._items(node, level + 1), level, nodes=node)
        tag = node[TAG]
        if tag == "array":  # most nodes of a big record
            return f"array({node['i']})"
        if tag == "tuple":
            items = self._items(node["v"], level + 1)
            if len(items) == 1:
                return f"({items[0]},)"
            return self._sequence("(", ")", items, level, nodes=node["v"])
        if tag in ("dict", "odict"):
            items = [
                f"{self._emit(k, level + 1)}: {self._emit(v, level + 1)}" for k, v in node["v"]
            ]
            if tag == "dict":
                return self._sequence("{", "}", items, level)
            self.imports.add("collections")
            pairs = [
                f"({self._emit(k, level + 1)}, {self._emit(v, level + 1)})" for k, v in node["v"]
            ]
            return "collections.OrderedDict(" + self._sequence("[", "]", pairs, level) + ")"
        if tag == "int":
            return node["v"]
        if tag == "scalar":
            return f"np.frombuffer({node['v']!r}, dtype=dtype_from_name({node['dtype']!r}))[0]"
        if tag == "obj":
            return self._obj(node, level)
        if tag == "enum":
            return f"{self._name(node['type'])}[{node['name']!r}]"
        if tag in ("fn", "type"):
            return self._name(node["name"])
        if tag == "partial":
            self.imports.add("functools")
            args = [self._emit(node["fn"], level + 1)]
            args += [self._emit(a, level + 1) for a in node["args"]]
            args += [f"{k}={self._emit(v, level + 1)}" for k, v in node["kw"]]
            return self._sequence("functools.partial(", ")", args, level)
        if tag == "jnp_type":
            self.imports.add("jax.numpy")
            return f"jax.numpy.{node['name']}"
        if tag == "np_type":
            import numpy as np

            if isinstance(getattr(np, node["name"], None), type):
                return f"np.{node['name']}"
            self.imports.add("ml_dtypes")
            return f"ml_dtypes.{node['name']}"
        if tag == "dtype":
            return f"dtype_from_name({node['name']!r})"
        if tag == "builtin_type":
            return node["name"]
        if tag == "slice":
            return "slice(" + ", ".join(self._emit(v, level + 1) for v in node["v"]) + ")"
        if tag == "complex":
            return f"complex({_float(node['v'][0])}, {_float(node['v'][1])})"
        if tag == "frozenset":
            if not node["v"]:
                return "frozenset()"
            items = [self._emit(v, level + 1) for v in node["v"]]
            return "frozenset(" + self._sequence("{", "}", items, level) + ")"
        if tag == "initializer":
            factory = self._name(node["factory"])
            args = [f"{k}={self._emit(v, level + 1)}" for k, v in node["kw"]]
            return self._sequence(f"{factory}(", ")", args, level)
        raise ValueError(f"cannot write node kind {tag!r} as Python")

    def _obj(self, node: dict, level: int) -> str:
        cls = self._name(node["type"])
        emit, inner = self._emit, level + 1
        fields = [f"{name}={emit(value, inner)}" for name, value in node["f"]]
        return self._sequence(f"build({cls}, ", ")", fields, level, head=f"build({cls},")

    def _name(self, name: str) -> str:
        written = self._names.get(name)
        if written is None:
            module, qualname = name.split(":")
            self.imports.add(module)
            if name.startswith(_FLAX_NAMES):
                self.names_flax = True
            written = self._names[name] = f"{module}.{qualname}"
        return written

    def _sequence(
        self,
        open_: str,
        close: str,
        items: list[str],
        level: int,
        head: str | None = None,
        nodes: list | None = None,
    ) -> str:
        """`items` inline if they fit, else one per line with array comments.

        `nodes`: the nodes `items` were written from by `_items`, where only
        array nodes write as `array(N)`: their comments come by index, with
        no look at the text (most lines of a big record's script).
        """
        # The inline form's length, known before it is built: a long sequence
        # (most of a big record) is not joined only to be thrown away.
        width = len(open_) + len(close) + sum(map(len, items)) + 2 * max(len(items) - 1, 0)
        if width + len(_INDENT) * level <= _INLINE_WIDTH:
            inline = open_ + ", ".join(items) + close
            if "\n" not in inline:
                return inline
        inner = _INDENT * (level + 1)
        if nodes is not None:
            # What `_array_comment` reads from `array(N)`: a non-negative int N.
            of = self._index_comment
            comments = [
                of(node["i"])
                if type(node) is dict
                and node.get(TAG) == "array"
                and type(node["i"]) is int
                and node["i"] >= 0
                else ""
                for node in nodes
            ]
            body = "".join([f"{inner}{item},{c}\n" for item, c in zip(items, comments, strict=True)])
        else:
            comment = self._array_comment
            body = "".join([f"{inner}{item},{comment(item)}\n" for item in items])
        return f"{(head or open_).rstrip()}\n{body}{_INDENT * level}{close}"

    def _items(self, nodes: list, level: int) -> list[str]:
        """`_emit` of each node; array nodes, most of a big record's items, without the call."""
        emit = self._emit
        return [
            f"array({node['i']})"
            if type(node) is dict and node.get(TAG) == "array"
            else emit(node, level)
            for node in nodes
        ]

    def _array_comment(self, item: str) -> str:
        # What `_ARRAY_ITEM` matches ends in a digit (`\d` is `isdecimal`) and ")":
        # most other items fail that at once.
        if item[-1:] != ")" or not item[-2:-1].isdecimal():
            return ""
        digits = item[6:-1] if item[:6] == "array(" else ""
        if digits.isascii() and digits.isdigit():
            # `array(N)`, most items of a big record: what the pattern would find, without it.
            index = int(digits)
        else:
            match = _ARRAY_ITEM(item)
            if not match:
                return ""
            index = int(match.group(1))
        return self._index_comment(index)

    def _index_comment(self, index: int) -> str:
        comment = self._comments.get(index)
        if comment is None:
            desc = self._arrays[index]
            kind = " key" if desc["kind"] == "key" else " weak" if desc.get("weak_type") else ""
            comment = self._comments[index] = f"  # {desc['dtype']}{list(desc['shape'])}{kind}"
        return comment


# An item that is an array, bare or as a keyword (`weights=array(3)`): it gets a comment.
_ARRAY_ITEM = re.compile(r"(?:\w+=)?array\((\d+)\)").fullmatch


def _float(value: float) -> str:
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


def template_names() -> list[str]:
    """The templates shipped with reprokit."""
    return sorted(os.listdir(templates_dir()))


if __name__ == "__main__":
    raise SystemExit(_render_main())
