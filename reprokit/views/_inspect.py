"""A look inside an archive without running, or even rebuilding, anything.

`reprokit inspect` is what a careful maintainer runs first on an archive
from a stranger: it reads the manifest and the encoded structure and prints
them as text, resolving no names, importing no jax, and calling no code.
Array statistics (min/max/mean, NaN and Inf counts) come from the raw
payloads reinterpreted with numpy and ml_dtypes alone, for the same reason.

`inspect --html` is the one exception, and only when asked: a treescope
view needs live objects, so it rebuilds the record through the same
allow-listed loader as `reprokit run` (still never calling the layer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from reprokit.archive import _format, _grammar
from reprokit.archive._collector import collector_paused
from reprokit.archive._grammar import TAG

_MAX_OUTLINE_LINES = 400


def outline(
    node: Any, arrays: list[dict], label: str = "", depth: int = 0, out: list | None = None
) -> list[str]:
    """An indented outline of an encoded tree: type names, containers and array shapes."""
    out = [] if out is None else out
    if len(out) >= _MAX_OUTLINE_LINES:
        return out
    pad = "  " * depth
    prefix = f"{pad}{label}: " if label else pad
    if isinstance(node, list):
        out.append(f"{prefix}list[{len(node)}]")
        for i, item in enumerate(node):
            outline(item, arrays, f"[{i}]", depth + 1, out)
        return out
    if not isinstance(node, dict):
        text = repr(node)
        out.append(prefix + (text if len(text) <= 80 else text[:77] + "..."))
        return out
    tag = node.get(TAG)
    if tag == "obj":
        out.append(f"{prefix}{_short(node['type'])}")
        for name, value in node["f"]:
            outline(value, arrays, name, depth + 1, out)
    elif tag == "array":
        out.append(prefix + array_label(arrays, node["i"]))
    elif tag in ("tuple",):
        out.append(f"{prefix}tuple[{len(node['v'])}]")
        for i, item in enumerate(node["v"]):
            outline(item, arrays, f"[{i}]", depth + 1, out)
    elif tag in ("dict", "odict"):
        out.append(f"{prefix}{'OrderedDict' if tag == 'odict' else 'dict'}[{len(node['v'])}]")
        for key, value in node["v"]:
            outline(value, arrays, f"[{_key_label(key)}]", depth + 1, out)
    elif tag in ("fn", "type"):
        out.append(f"{prefix}{node['name'].replace(':', '.')}")
    elif tag == "enum":
        out.append(f"{prefix}{_short(node['type'])}.{node['name']}")
    elif tag == "partial":
        out.append(f"{prefix}functools.partial")
        outline(node["fn"], arrays, "func", depth + 1, out)
        for key, value in node["kw"]:
            outline(value, arrays, key, depth + 1, out)
    elif tag in ("jnp_type", "np_type", "dtype", "builtin_type"):
        out.append(f"{prefix}{tag}:{node['name']}")
    elif tag == "frozenset":
        out.append(f"{prefix}frozenset[{len(node['v'])}]")
        for i, item in enumerate(node["v"]):
            outline(item, arrays, f"<item {i}>", depth + 1, out)
    elif tag == "initializer":
        # An initializer closure, recorded as the factory call that makes it.
        out.append(f"{prefix}{node['factory'].replace(':', '.')}(...)")
        for key, value in node["kw"]:
            outline(value, arrays, key, depth + 1, out)
    else:
        out.append(f"{prefix}<{tag}>")
    if len(out) == _MAX_OUTLINE_LINES:
        out.append(f"{pad}... (outline truncated)")
    return out


def _key_label(key: Any) -> str:
    """A dict key as Python would show it; tuples of plain values too (unflaxify's call keys)."""
    if isinstance(key, dict) and key.get(TAG) == "tuple" and isinstance(key.get("v"), list):
        items = key["v"]
        if all(item is None or isinstance(item, (bool, int, float, str)) for item in items):
            return repr(tuple(items))
    return repr(key)


def _short(name: str) -> str:
    module, qualname = name.split(":", 1) if ":" in name else ("", name)
    return f"{module}.{qualname}" if module and not module.startswith("penzai.") else qualname


def array_label(arrays: list[dict], index: Any) -> str:
    if not isinstance(index, int) or not 0 <= index < len(arrays):
        return f"array #{index} (missing)"
    desc = arrays[index]
    extra = (
        f" key<{desc.get('key_impl')}>"
        if desc["kind"] == "key"
        else " weak"
        if desc.get("weak_type")
        else ""
    )
    shape = ",".join(str(s) for s in desc["shape"])
    kind = "np." if desc["kind"] == "numpy" else ""
    return f"{kind}{desc['dtype']}[{shape}]{extra}  (array #{index})"


def describe_archive(
    manifest: dict,
    structure: dict,
    sha256: str,
    statistics: list[dict] | None = None,
    self_check: dict | None = None,
) -> str:
    """The text `reprokit inspect` prints; `statistics` (from `archive_statistics`) adds a table.

    `self_check` is the archive's `selfcheck.json` as `open_archive` reads it.
    """
    from reprokit.environment._diff import format_environment_summary

    layer, call = manifest["layer"], manifest["call"]
    lines = [
        f"archive: reprokit format {manifest['format_version']}, packed by reprokit "
        f"{manifest.get('reprokit_version', '?')} on {manifest.get('created', '?')}",
        f"sha256: {sha256}",
        f"recorded issue: {_format.describe_signature(manifest['signature'])}",
        f"layer: {layer['type']} at {layer['keypath']}{_format.flax_suffix(layer)}",
        f"call: {call.get('index', 0) + 1} of {call.get('count', 1)}, captured {manifest['mode']}",
    ]
    lines += _format.describe_backward(manifest)  # a gradient issue's cotangent and gradients
    from reprokit.archive._provenance import found_by_lines, self_check_lines

    lines += found_by_lines(manifest) + self_check_lines(self_check, manifest)
    if manifest["note"]:
        lines.append(f"note: {manifest['note']}")
    if manifest["modules"]:
        lines.append(
            "needs your modules: "
            + ", ".join(manifest["modules"])
            + " (replay with --allow-module for each, only if you trust them)"
        )
    from reprokit.record import _bundle
    from reprokit.replaying import _sharding

    lines += _bundle.describe(manifest)
    for mesh in _sharding.recorded_meshes(structure["arrays"]):
        lines.append(
            f"sharded: {mesh['arrays']} arrays over mesh {_sharding.mesh_text(mesh['mesh'])} "
            f"({mesh['device_count']} devices; run --mesh chooses where they go)"
        )
    multiprocess = manifest.get("multiprocess")
    if isinstance(multiprocess, dict):
        lines.append(
            f"captured by {multiprocess.get('process_count')} processes; arrays no process "
            f"held whole: {multiprocess.get('global_arrays')} ({multiprocess.get('storage')})"
        )
    if manifest.get("exception_traceback"):
        lines.append("traceback at capture:")
        lines += [f"  {line}" for line in manifest["exception_traceback"]]
    lines.append("environment:")
    lines += [
        "  " + line for line in format_environment_summary(manifest["environment"]).splitlines()
    ]
    arrays = structure["arrays"]
    total = sum(d["nbytes"] for d in arrays)
    filled = sum(isinstance(d, dict) and "fill" in d for d in arrays)
    lines.append(
        f"arrays: {len(arrays)} ({_format.human_bytes(total)})"
        + (f", {filled} stored as fills (one value repeated, no bytes)" if filled else "")
    )
    if statistics:
        lines.append(
            "  min, max and mean are over finite values; NaN, +Inf and -Inf are counts; "
            "a one-element array shows its value (= ...)"
        )
        lines += ["  " + line for line in format_statistics(statistics).splitlines()]
    lines.append("structure:")
    for name, node in structure["record"].items():
        lines += ["  " + line for line in outline(node, arrays, name)]
    return "\n".join(lines)


# ------------------------------------------------------------------ paths


def walk_encoded(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Yields (path, node) for every node of an encoded tree, parents before children.

    Paths read like Python: `.field`, `[index]`, `['key']`, so a maintainer
    can find the value in the rebuilt record or in `replay.py`.
    """
    return _grammar.walk(node, path)


def array_paths(record: dict) -> dict[int, str]:
    """Where each array of the table first appears in the record (index -> path).

    State variables are named by their labels (`initial_var_values['sampler/
    cache_0'].value`), not by their position in the tuple.
    """
    found: dict[int, str] = {}
    with collector_paused():
        for name, node in record.items():
            labels = _state_labels(name, node)
            # `walk_encoded`'s order (parents first, children in written
            # order), with a stack of sibling iterators: an array, most of a
            # big record's nodes, is handled where its parent lists it.
            stack = [iter(((name, node),))]
            while stack:
                for where, item in stack[-1]:
                    if isinstance(item, dict):
                        if item.get(TAG) == "array":
                            index = item.get("i")
                            if isinstance(index, int) and index not in found:
                                found[index] = _labelled(where, labels) if labels else where
                            continue
                    elif not isinstance(item, list):
                        continue  # a plain value: no children
                    nested = _grammar.children(item, where)
                    if nested:
                        stack.append(iter(nested))
                        break
                else:
                    stack.pop()
    return found


def _state_labels(name: str, node: Any) -> dict[str, str]:
    """`initial_var_values[2]` -> `initial_var_values['label']` for each labelled state variable."""
    if name not in ("initial_var_values", "final_var_values") or not isinstance(node, dict):
        return {}
    items = node.get("v") if node.get(TAG) in ("tuple", "list") else None
    labels = {}
    for position, item in enumerate(items if isinstance(items, list) else []):
        fields = item.get("f") if isinstance(item, dict) else None
        label = next(
            (
                field[1]
                for field in (fields if isinstance(fields, list) else [])
                if isinstance(field, list) and len(field) == 2 and field[0] == "label"
            ),
            None,
        )
        if isinstance(label, str):
            # An archive's string: printable, short, quoted.
            labels[f"{name}[{position}]"] = f"{name}[{_format.printable(label)[:80]!r}]"
    return labels


def _labelled(where: str, labels: dict[str, str]) -> str:
    for prefix, named in labels.items():
        if where == prefix or where.startswith((prefix + ".", prefix + "[")):
            return named + where[len(prefix) :]
    return where


# ------------------------------------------------------------------ statistics

# Statistics are accumulated over chunks so that a multi-GiB weight never
# needs a float64 copy of itself.
_STATS_CHUNK = 1 << 20
_MAX_TABLE_ROWS = 400
# The trailing dimension of a PRNG key's data holds the key words, not keys.
_KEY_WORDS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}


def _value_kind(dtype: np.dtype) -> str:
    """'bool', 'int', 'float' or 'complex', also for ml_dtypes (whose numpy kind is 'V')."""
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu" or dtype.name.startswith(("int", "uint")):
        return "int"
    if dtype.kind == "c":
        return "complex"
    return "float"


def key_shape(desc: dict) -> list[int]:
    """The shape of a PRNG key array: its key data's shape without the key words."""
    shape = list(desc["shape"])
    if shape and shape[-1] == _KEY_WORDS.get(desc.get("key_impl")):
        return shape[:-1]
    return shape


def array_statistics(desc: dict, raw: np.ndarray) -> dict:
    """Shape, dtype, finite min/max/mean and NaN/Inf counts of one array payload.

    `raw` is the payload as uint8 (from `ArchiveReader.read_aligned`); it is
    reinterpreted with numpy and ml_dtypes only, never handed to jax. Min, max
    and mean are over finite values (None when there are none), because the
    NaN and Inf counts already say what the non-finite ones are; for complex
    arrays they are over magnitudes. PRNG key arrays get no statistics: their
    bits are not numbers.
    """
    from reprokit.portable._arrays import dtype_from_name

    if desc["kind"] == "key":
        return {
            "kind": "key",
            "dtype": f"key<{desc.get('key_impl')}>",
            "shape": key_shape(desc),
            "size": math.prod(key_shape(desc)),
            "min": None,
            "max": None,
            "mean": None,
            "nan": 0,
            "inf": 0,
            "posinf": 0,
            "neginf": 0,
        }
    dtype = dtype_from_name(desc["dtype"])
    values = raw.view(dtype).reshape(-1)
    kind = _value_kind(dtype)
    nan = inf = posinf = count = 0
    low = high = None
    total = 0.0
    for start in range(0, values.size, _STATS_CHUNK):
        chunk = values[start : start + _STATS_CHUNK]
        if kind == "complex":
            wide = chunk.astype(np.complex128)
            bad_nan = np.isnan(wide.real) | np.isnan(wide.imag)
            bad_inf = (np.isinf(wide.real) | np.isinf(wide.imag)) & ~bad_nan
            nan += int(bad_nan.sum())
            inf += int(bad_inf.sum())
            finite = np.abs(wide[~(bad_nan | bad_inf)])
        elif kind == "float":
            wide = chunk.astype(np.float64)
            nan += int(np.isnan(wide).sum())
            inf += int(np.isinf(wide).sum())
            posinf += int(np.isposinf(wide).sum())
            finite = wide[np.isfinite(wide)]
        else:
            # Integers keep their exact extremes (numpy ints natively, so
            # uint64 cannot wrap); only the mean goes through float64.
            if kind == "bool":
                finite = chunk.astype(np.uint8)
            else:
                finite = chunk if dtype.kind in "iu" else chunk.astype(np.int64)
        if finite.size == 0:
            continue
        chunk_low, chunk_high = finite.min().item(), finite.max().item()
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
        total += float(finite.sum(dtype=np.float64))
        count += int(finite.size)
    mean = total / count if count else None
    if mean is not None and not math.isfinite(mean):
        mean = None  # the float64 sum overflowed; JSON has no Infinity
    if kind == "bool" and low is not None:
        low, high = bool(low), bool(high)
    stats = {
        "kind": desc["kind"],
        "dtype": desc["dtype"],
        "shape": list(desc["shape"]),
        "size": int(values.size),
        "min": low,
        "max": high,
        "mean": mean,
        "nan": nan,
        "inf": inf,
        # +Inf and -Inf apart (a mask's -inf is not an overflow's +inf);
        # complex values count only in "inf".
        "posinf": posinf if kind != "complex" else 0,
        "neginf": inf - posinf if kind != "complex" else 0,
    }
    if values.size == 1 and kind != "complex":
        stats["value"] = _scalar_value(values, kind)
    return stats


def _scalar_value(values: np.ndarray, kind: str) -> Any:
    """The one value of a one-element array, for the table; JSON-safe ("nan", "inf", "-inf")."""
    if kind == "float":
        return _first_value(float(values.astype(np.float64)[0]), kind)
    if kind == "bool":
        return bool(values[0])
    return values.astype(np.int64)[0].item() if values.dtype.kind not in "iu" else values[0].item()


def archive_statistics(opened: Any) -> list[dict]:
    """Statistics of every array of an opened archive, each with its index and first path."""
    with collector_paused():
        return _archive_statistics(opened)


def _archive_statistics(opened: Any) -> list[dict]:

    arrays = opened.structure["arrays"]
    where = array_paths(opened.structure["record"])
    reader = opened.reader
    rows: list[dict | None] = [None] * len(arrays)
    small: list[int] = []
    members: list[str] = []
    for index, desc in enumerate(arrays):
        if "checkpoint" in desc:
            continue  # in the orbax checkpoint: read with tensorstore only on replay
        if desc.get("fill") is not None:
            rows[index] = _row(index, where, fill_statistics(desc))
            continue
        # `open_archive` checked every payload member's size against its descriptor.
        member = _format.array_member(index)
        if desc["kind"] != "key" and 0 < desc["nbytes"] <= _BATCH_BYTES:
            small.append(index)
            members.append(member)
        else:
            rows[index] = _row(index, where, array_statistics(desc, reader.read_aligned(member)))
    # In batches of a few MiB: what is read at once stays small, however many arrays.
    start = batch_bytes = 0
    for end, index in enumerate(small, 1):
        batch_bytes += arrays[index]["nbytes"]
        if batch_bytes >= _BATCH_TOTAL or end == len(small):
            payloads = reader.read_small_members(members[start:end])
            _small_statistics(arrays, small[start:end], payloads, where, rows)
            start, batch_bytes = end, 0
    return [row for row in rows if row is not None]


def _row(index: int, where: dict[int, str], stats: dict) -> dict:
    return {"index": index, "where": where.get(index, "(unused)"), **stats}


# Arrays up to this size are read in batches and summarised together: an
# archive of 100,000 small arrays cost a read and a dozen numpy calls each.
_BATCH_BYTES = 1 << 16
_BATCH_TOTAL = 8 << 20
# An integer array's float64 sum (`sum(dtype=float64)`) goes through numpy's
# cast buffer of 8192 elements: up to that, it is the pairwise sum of the
# float64 values, which a segment sum reproduces; longer integer arrays take
# the one-by-one path.
_BATCH_INT_ELEMENTS = 8192


def _small_statistics(
    arrays: list[dict],
    indices: list[int],
    payloads: list,
    where: dict[int, str],
    rows: list[dict | None],
) -> None:
    """The rows of `array_statistics` for many small arrays at once, equal to it value for value.

    The payloads of one dtype are joined into one flat array: NaN and Inf
    counts are segment sums over it (`np.add.reduceat`), and min, max and
    sum reduce the rows of blocks of arrays with as many finite values (see
    `_segment_statistics`), so they are over the same values, summed in the
    same order, as `array_statistics` gives one array.
    Kinds a segment cannot express (complex; integers longer than numpy's
    cast buffer) go through `array_statistics`.
    """
    from reprokit.portable._arrays import dtype_from_name

    groups: dict[str, list[int]] = {}
    for position, index in enumerate(indices):
        groups.setdefault(arrays[index]["dtype"], []).append(position)
    for dtype_name, positions in groups.items():
        dtype = dtype_from_name(dtype_name)
        kind = _value_kind(dtype)
        itemsize = dtype.itemsize
        together: list[int] = []
        for position in positions:
            nbytes = arrays[indices[position]]["nbytes"]
            if (
                kind == "complex"
                or nbytes % itemsize
                or (kind != "float" and nbytes // itemsize > _BATCH_INT_ELEMENTS)
            ):
                index = indices[position]
                raw = np.frombuffer(payloads[position], dtype=np.uint8)
                rows[index] = _row(index, where, array_statistics(arrays[index], raw))
            else:
                together.append(position)
        if together:
            group = [indices[position] for position in together]
            data = b"".join([payloads[position] for position in together])
            _segment_statistics(arrays, group, np.frombuffer(data, dtype=dtype), kind, where, rows)


def _segment_statistics(
    arrays: list[dict],
    indices: list[int],
    values: np.ndarray,
    kind: str,
    where: dict[int, str],
    rows: list[dict | None],
) -> None:
    """`_small_statistics` of the arrays `indices`, whose values lie one after another in `values`."""
    sizes = np.fromiter((arrays[index]["nbytes"] for index in indices), np.int64, len(indices))
    sizes //= values.itemsize
    starts = np.cumsum(sizes) - sizes  # every size is at least 1
    zeros = [0] * len(indices)
    nan = inf = posinf = zeros
    if kind == "float":
        wide = values.astype(np.float64)
        finite_mask = np.isfinite(wide)
        if finite_mask.all():
            finite, counts = wide, sizes
        else:
            nan = np.add.reduceat(np.isnan(wide), starts, dtype=np.int64).tolist()
            inf = np.add.reduceat(np.isinf(wide), starts, dtype=np.int64).tolist()
            posinf = np.add.reduceat(np.isposinf(wide), starts, dtype=np.int64).tolist()
            finite = wide[finite_mask]
            counts = np.add.reduceat(finite_mask, starts, dtype=np.int64)
        firsts = wide[starts].tolist()  # a one-element array's value
    else:
        if kind == "bool":
            finite = values.astype(np.uint8)
        else:
            # Integers keep their exact extremes (numpy ints natively, so
            # uint64 cannot wrap); only the mean goes through float64.
            finite = values if values.dtype.kind in "iu" else values.astype(np.int64)
        counts = sizes
        firsts = finite[starts].tolist()
    # Arrays with as many finite values are stacked into one 2-D block, whose
    # rows numpy reduces exactly as it reduces a 1-D array; a segment
    # reduction (`np.add.reduceat`) sums in another order and rounds otherwise.
    cuts = np.cumsum(counts) - counts
    lows: list = [None] * len(indices)
    highs, totals = list(lows), list(lows)
    by_count = np.argsort(counts, kind="stable")
    groups = np.split(by_count, np.flatnonzero(np.diff(counts[by_count])) + 1)
    with np.errstate(all="ignore"):  # a sum may overflow: its mean is None
        for slots in groups:
            count = int(counts[slots[0]])
            if count == 0:
                continue  # no finite values: no min, max or mean
            if len(groups) == 1 and count * len(slots) == finite.size:
                block = finite.reshape(len(slots), count)  # one size, one after another
            else:
                block = finite[cuts[slots][:, None] + np.arange(count)]
            low, high = block.min(axis=1).tolist(), block.max(axis=1).tolist()
            total = block.astype(np.float64, copy=False).sum(axis=1).tolist()
            if len(groups) == 1:
                lows, highs, totals = low, high, total
                break
            for slot, a, b, c in zip(slots.tolist(), low, high, total, strict=True):
                lows[slot], highs[slot], totals[slot] = a, b, c
    sizes_list, counts_list = sizes.tolist(), counts.tolist()
    for row, index in enumerate(indices):
        desc = arrays[index]
        count, low, high, size = counts_list[row], lows[row], highs[row], sizes_list[row]
        mean = None
        if count:
            # 0.0 + as `array_statistics` accumulates: an all -0.0 array's mean is 0.0.
            mean = (0.0 + totals[row]) / count
            if not math.isfinite(mean):
                mean = None  # the float64 sum overflowed; JSON has no Infinity
            if kind == "bool":
                low, high = bool(low), bool(high)
        stats = {
            "kind": desc["kind"],
            "dtype": desc["dtype"],
            "shape": list(desc["shape"]),
            "size": size,
            "min": low,
            "max": high,
            "mean": mean,
            "nan": nan[row],
            "inf": inf[row],
            "posinf": posinf[row],
            "neginf": inf[row] - posinf[row],
        }
        if size == 1:
            stats["value"] = _first_value(firsts[row], kind)
        rows[index] = _row(index, where, stats)


def _first_value(value: Any, kind: str) -> Any:
    """The table's value of a one-element array from its value (float64, or a Python int)."""
    if kind == "float":
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return bool(value) if kind == "bool" else value


def fill_statistics(desc: dict) -> dict:
    """`array_statistics` of an array stored as a fill, from one element, whatever its size.

    The row also says which fill ("zeros" or "repeat"): such an array has no
    payload, and an all-NaN one is often the very thing a report is about.
    """
    from reprokit.portable._arrays import dtype_from_name, filled

    size = math.prod(desc["shape"])
    if desc["kind"] == "key" or size == 0:
        # Key statistics never read the bits, and an empty array has none.
        return {**array_statistics(desc, np.empty(0, np.uint8)), "fill": desc["fill"]}
    one = {**desc, "shape": [1], "nbytes": dtype_from_name(desc["dtype"]).itemsize}
    stats = array_statistics(one, filled(one))
    if size != 1:
        stats.pop("value", None)  # one element read, but the array holds many
    return {
        **stats,
        "shape": list(desc["shape"]),
        "size": size,
        "nan": stats["nan"] * size,
        "inf": stats["inf"] * size,
        "posinf": stats["posinf"] * size,
        "neginf": stats["neginf"] * size,
        "fill": desc["fill"],
    }


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if value in ("nan", "inf", "-inf"):  # a one-element array's non-finite value
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _wrap_path(text: str, width: int) -> list[str]:
    """A keypath cut into lines of at most `width`, before a `.` or `[` where possible.

    Never cut from the left: two arrays deep in different blocks would print
    the same tail. Continuation lines are indented by two spaces.
    """
    width = max(width, 8)
    lines: list[str] = []
    while len(text) > width:
        cut = max(text.rfind(".", 1, width), text.rfind("[", 1, width))
        if cut <= (2 if lines else 0):
            cut = width
        lines.append(text[:cut])
        text = "  " + text[cut:]
    lines.append(text)
    return lines


def format_statistics(rows: list[dict]) -> str:
    """The per-array table `reprokit inspect` prints (at most 400 rows)."""
    header = ("#", "where", "array", "min", "max", "mean", "NaN", "+Inf", "-Inf")
    table = []
    for row in rows[:_MAX_TABLE_ROWS]:
        shape = ",".join(str(s) for s in row["shape"])
        where = _wrap_path(row["where"], 56)
        if "value" in row:
            # One element: its value, NaN or Inf included, in place of min/max/mean.
            stats = (f"= {_number(row['value'])}", "", "")
        else:
            stats = (_number(row["min"]), _number(row["max"]), _number(row["mean"]))
        signed = "posinf" in row and (row["posinf"] + row["neginf"] == row["inf"])
        infs = (str(row["posinf"]), str(row["neginf"])) if signed else (f"±{row['inf']}", "")
        table.append(
            (
                str(row["index"]),
                where[0],
                f"{row['dtype']}[{shape}]" + (f" ({row['fill']})" if row.get("fill") else ""),
                *stats,
                str(row["nan"]),
                *infs,
            )
        )
        table += [("", more, "", "", "", "", "", "", "") for more in where[1:]]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    right = {0, 3, 4, 5, 6, 7, 8}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [line(header)] + [line(r) for r in table]
    if len(rows) > _MAX_TABLE_ROWS:
        lines.append(f"... {len(rows) - _MAX_TABLE_ROWS} more arrays (reprokit inspect --json)")
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML view

_HTML_PARTS = (
    ("submodel", "Layer"),
    ("argument", "Argument"),
    ("side_inputs", "Side inputs"),
    ("initial_var_values", "State before the call"),
    ("output", "Recorded output"),
    ("final_var_values", "State after the call"),
    ("output_cotangent", "Cotangent at the output (backward pass)"),
    ("gradients", "Gradients the layer produced"),
)

_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table.facts td { padding: 0.1em 1em 0.1em 0; vertical-align: top; }
code, pre { font-family: ui-monospace, monospace; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def render_html(loaded: Any, sha256: str = "") -> str:
    """A self-contained HTML page showing a loaded archive's record with treescope.

    Each part of the record (layer, inputs, state, recorded output) is
    rendered by `treescope.render_to_html` with its array autovisualizer, so
    arrays appear as treescope's heatmaps. The page needs JavaScript (treescope
    renders in the browser) but no network: treescope inlines its scripts and
    styles, and the page links nothing.
    """
    import html

    import treescope

    manifest = loaded.manifest
    layer = manifest["layer"]
    esc = html.escape
    facts = [
        ("recorded issue", _format.describe_signature(manifest["signature"])),
        ("layer", f"{layer['type']} at {layer['keypath'] or '(root)'}{_format.flax_suffix(layer)}"),
        (
            "call",
            f"{manifest['call'].get('index', 0) + 1} of {manifest['call'].get('count', 1)},"
            f" captured {manifest['mode']}",
        ),
        (
            "packed",
            f"reprokit {manifest.get('reprokit_version', '?')}, {manifest.get('created', '?')}",
        ),
    ]
    facts += [("backward pass", line) for line in _format.describe_backward(manifest)]
    if manifest["note"]:
        facts.append(("note", manifest["note"]))
    if sha256:
        facts.append(("sha256", sha256))
    body = [
        f"<h1>reprokit archive: {esc(layer['type'].split('.')[-1])} at "
        f"<code>{esc(layer['keypath'] or '(root)')}</code></h1>",
        '<table class="facts">',
        *(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in facts),
        "</table>",
    ]
    if manifest.get("exception_traceback"):
        body.append("<h2>Traceback at capture</h2>")
        body.append("<pre>" + esc("\n".join(manifest["exception_traceback"])) + "</pre>")
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        for name, title in _HTML_PARTS:
            if name not in loaded.record:
                continue
            body.append(f'<h2 id="{name}">{esc(title)}</h2>')
            # ignore_exceptions: one odd leaf shows a fallback instead of
            # costing the maintainer the whole page.
            body.append(treescope.render_to_html(loaded.record[name], ignore_exceptions=True))
    title = f"reprokit: {layer['type'].split('.')[-1]} at {layer['keypath'] or '(root)'}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_html(
    archive: str | os.PathLike,
    out: str | os.PathLike,
    *,
    trust: Any = None,
    limits: Any = None,
) -> int:
    """Rebuilds `archive` (allow-listed, nothing called) and writes its HTML view to `out`.

    `trust` (a `reprokit.archive._trust.TrustPolicy`; default: nothing
    beyond the allow-list) names the maintainer's modules and, with
    `trust_code`, imports the code the archive bundles, as `reprokit run
    --trust-code` does; it runs with your permissions.

    Returns the size of the written file in bytes. The file is written
    atomically, so a failed rendering never leaves half a page behind.

    Raises:
      ArchiveError: the archive is invalid, or names a type outside the
        allow-list plus `trust.modules`.
      UsageError: `out` cannot be written.
    """
    import hashlib

    from reprokit._errors import UsageError
    from reprokit.archive._trust import TrustPolicy
    from reprokit.replaying._replay import load_archive

    loaded = load_archive(archive, trust or TrustPolicy(), limits=limits)
    digest = hashlib.sha256()
    with open(archive, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    page = render_html(loaded, digest.hexdigest()).encode("utf-8")
    from reprokit.views._script import write_atomically

    out = os.fspath(out)
    try:
        write_atomically(out, page)  # never through a planted symlink
    except OSError as error:
        raise UsageError(f"cannot write {out!r}: {error.strerror or error}") from None
    return len(page)


# ------------------------------------------------------------------ environment


def describe_environment(env: dict) -> str:
    """The text `reprokit env` prints: the summary, then every recorded field."""
    from reprokit.environment._diff import format_environment_summary

    lines = [format_environment_summary(env), "", "packages:"]
    packages = env.get("packages") or {}
    width = max((len(name) for name in packages), default=0)
    lines += [
        f"  {name.ljust(width)}  {version or 'not installed'}" for name, version in packages.items()
    ]
    backend = env.get("backend") or {}
    lines.append("backend:")
    lines += [f"  {key}: {value}" for key, value in backend.items()]
    lines.append("environment variables (allow-listed):")
    env_vars = env.get("env_vars") or {}
    lines += [f"  {key}={value}" for key, value in sorted(env_vars.items())] or ["  (none set)"]
    flags = env.get("xla_flags") or []
    lines.append("XLA flags: " + (" ".join(flags) if flags else "(none)"))
    if env.get("xla_flags_dropped"):
        lines.append(f"  ({env['xla_flags_dropped']} other XLA_FLAGS tokens not recorded)")
    config = env.get("jax_config") or {}
    lines.append(f"jax config: {len(config)} options recorded (reprokit env --json lists them)")
    return "\n".join(lines)
