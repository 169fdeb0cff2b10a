"""`reprokit.pack`: capture a failing layer and write it as one `.repro.zip`.

This is the pipeline's front half, capture -> encode -> archive: run the
model once with a capturer on the selected layer, pick the call to keep,
decide the recorded issue (the signature), encode the record, and stream it
with the environment, a generated `replay.py` and a README into one archive
written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any

from reprokit._errors import CaptureError, UsageError
from reprokit._progress import progress
from reprokit.archive import _allowlist, _format
from reprokit.archive._container import ArchiveWriter
from reprokit.capture import _redact
from reprokit.capture._capture import CallRecord, capture_calls, choose_call
from reprokit.capture._selfcheck import describe as describe_self_check
from reprokit.capture._selfcheck import self_check
from reprokit.environment._scrub import scrub_text
from reprokit.environment._snapshot import capture_environment
from reprokit.portable._arrays import describe, repeated_element
from reprokit.portable._verdict import SIGNATURE_KINDS, detect_signature
from reprokit.record import _encoding
from reprokit.views._issue import GITHUB_ATTACHMENT_LIMIT, write_issue_snippet

_PROGRESS_BYTES = 256 * 2**20  # smaller archives are written before a bar would be read
# Below this, a repeated-element array is stored as it is: a few bytes saved
# would not be worth a descriptor a reader of the archive must understand.
_MIN_FILL_BYTES = 64 * 2**10


@dataclasses.dataclass(frozen=True)
class PackResult:
    """What `pack` wrote: where, which call, and the recorded issue."""

    path: str
    signature: dict
    keypath: str
    layer_type: str
    call_index: int
    call_count: int
    mode: str
    array_count: int
    array_bytes: int
    size: int
    # The GitHub issue snippet written next to the archive (None: not written).
    issue_path: str | None = None
    # What the fresh-process replay after packing measured (None: not run).
    self_check: dict | None = None
    # Parameter count, input shapes and what was redacted (for the sharing note).
    contents: dict | None = None
    # Members holding the reporter's own code (--bundle-code).
    bundled: tuple[str, ...] = ()
    # Arrays stored without payload: all zeros, or one element repeated.
    filled_arrays: int = 0

    def summary(self) -> str:
        """A few lines for the terminal: what was packed and how to replay it."""
        sig = _format.describe_signature(self.signature)
        name = os.path.basename(self.path)
        return "\n".join(
            [
                f"packed {self.layer_type} at {self.keypath} (call {self.call_index + 1} of "
                f"{self.call_count}, {self.mode}) into {self.path} ({_format.human_bytes(self.size)})",
                f"  recorded issue: {sig}",
                f"  arrays: {self.array_count} ({_format.human_bytes(self.array_bytes)})"
                + _fills_text(self.filled_arrays),
                f"  replay: reprokit run {name}" + (" --trust-code" if self.bundled else ""),
                *(
                    [
                        f"  bundled code: {', '.join(self.bundled)} (read it: reprokit inspect {name})"
                    ]
                    if self.bundled
                    else []
                ),
                f"     or: unzip {name} -d repro && python repro/replay.py",
                *(
                    [f"  issue text: {self.issue_path} (paste it into the issue)"]
                    if self.issue_path
                    else []
                ),
                *(
                    ["  warning: over GitHub's 25 MB attachment limit; see the issue text"]
                    if self.size > GITHUB_ATTACHMENT_LIMIT
                    else []
                ),
                *_contents_lines(self.contents),
                "  note: attachments on public repositories can be downloaded by anyone.",
                *([] if self.self_check is None else describe_self_check(self.self_check, self.mode)),
            ]
        )


def _fills_text(count: int) -> str:
    if not count:
        return ""
    return f", {count} of them one value repeated (stored as fills, no bytes)"


def pack(
    selection: Any,
    argument: Any,
    *,
    side_inputs: dict | None = None,
    out: str | os.PathLike = "layer.repro.zip",
    note: str = "",
    call: int | None = None,
    signature: str | None = None,
    mode: str | None = None,
    allow_modules: tuple[str, ...] | list[str] = (),
    check: bool = True,
    redact: Any = None,
    max_size: str | int | None = None,
    bundle_code: bool = False,
    gather: bool = False,
    shards_dir: str | os.PathLike | None = None,
    compress: bool = False,
) -> PackResult:
    """Captures the layer picked by `selection` while its model runs on `argument`, and packs it.

    Args:
      selection: a `pz.Selection` of exactly one `pz.nn.Layer` inside a model
        (e.g. `pz.select(model).at_instances_of(pz.nn.Attention).pick_nth_selected(2)`).
      argument: the model's positional argument.
      side_inputs: the model's side inputs (keyword arguments).
      out: archive path; by convention `NAME.repro.zip`.
      note: free text for the maintainer (what you saw, when).
      call: which call of the layer to pack (0-based); default: the first
        call that raises or returns NaN/Inf, else the first call.
      signature: the recorded issue: "exception", "nonfinite" or "output";
        default: detected from the call's outcome.
      mode: "eager" or "jit": how the layer is run for the record and on
        replay; default "jit" when the layer sits inside penzai's `Jitted`,
        else "eager".
      allow_modules: your own modules that hold classes or functions in the
        model; the maintainer must allow them too (`--allow-module`).
      check: replay the finished archive in a fresh process before returning
        and record whether it reproduces (the self-check); a few seconds.
      redact: replace private values, e.g. ["params=random"] or
        {"params": "random", "inputs": "random"} (kinds: random, zeros,
        shapes); weaker redactions are tried until the issue still reproduces.
      max_size: e.g. "25MB" (GitHub's attachment limit): compress, then zero
        the largest parameters the issue does not need, or refuse.
      compress: deflate each array member that shrinks by a tenth or more
        (slower to pack; replay reads it the same way); `max_size` does this
        by itself.
      bundle_code: copy the source of your own modules the layer needs (and
        of classes defined in your script) into the archive; the maintainer
        imports it only with `reprokit run --trust-code`.
      gather: with several jax processes, gather the arrays no process holds
        whole to every process instead of writing them with orbax (small
        layers only).
      shards_dir: with several jax processes, a folder reachable by all of
        them, in which each writes its shards (into `NAME.repro.zip.shards`,
        removed afterwards); default: the folder of `out`.

    Several jax processes (`jax.process_count() > 1`): call `pack` on every
    process; process 0 writes the archive (see `reprokit.capture._multihost`).

    Returns:
      A `PackResult` describing the archive.
    """
    if signature is not None and signature not in SIGNATURE_KINDS:
        raise UsageError(
            f"signature must be one of {', '.join(SIGNATURE_KINDS)}, not {signature!r}"
        )
    out = os.fspath(out)
    if not out.endswith(".zip"):
        raise UsageError(
            f"output {out!r} should end in .repro.zip (GitHub accepts .zip attachments)"
        )
    import jax

    if jax.process_count() > 1:
        if redact or max_size is not None or compress:
            raise UsageError(
                "redact, max_size and compress are not supported when packing from several "
                "processes"
            )
        from reprokit.capture._multihost import pack_multiprocess

        return pack_multiprocess(
            selection,
            argument,
            side_inputs=dict(side_inputs or {}),
            out=out,
            note=note,
            call=call,
            signature=signature,
            mode=mode,
            allow_modules=tuple(allow_modules),
            check=check,
            bundle_code=bundle_code,
            gather=gather,
            shards_dir=None if shards_dir is None else os.fspath(shards_dir),
        )
    capture = capture_calls(selection, argument, dict(side_inputs or {}), mode)
    record = choose_call(capture, call)
    if signature is not None:
        _check_heisenbug(capture, record, signature, selection, argument, side_inputs, mode)
    result = write_archive(
        record,
        out=out,
        keypath=capture.keypath,
        layer_type=capture.layer_type,
        mode=capture.mode,
        call_count=len(capture.calls),
        note=note,
        signature=signature,
        allow_modules=allow_modules,
        check=check,
        redact=redact,
        max_size=max_size,
        bundle_code=bundle_code,
        compress=compress,
    )
    return dataclasses.replace(result, issue_path=write_issue_snippet(result.path))


def _shows(record: CallRecord, kind: str) -> bool:
    try:
        detect_signature(record.outcome, kind)
    except ValueError:
        return False
    return True


def _check_heisenbug(capture, record, kind, selection, argument, side_inputs, mode) -> None:
    """Says so when the issue the user reports does not appear under capture, and what might help."""
    if _shows(record, kind):
        return
    showing = [call.index for call in capture.calls if _shows(call, kind)]
    if showing:
        raise UsageError(
            f"call {record.index} of the layer shows no {kind} issue, but call {showing[0]} does: "
            f"pass call={showing[0]} (--call {showing[0]})"
        )
    other = "eager" if capture.mode == "jit" else "jit"
    if mode is None or mode == capture.mode:
        retry = capture_calls(selection, argument, dict(side_inputs or {}), other)
        if any(_shows(call, kind) for call in retry.calls):
            raise UsageError(
                f"the selected layer shows no {kind} issue when run {capture.mode}, but it does "
                f"when run {other}: pass mode={other!r} (--mode {other})"
            )
    if capture.model_exception is not None and kind != "exception":
        where = "the model raised " + capture.model_exception["type"]
    else:
        where = "the capture saw no such issue in this layer"
    raise UsageError(
        f"signature {kind!r} asked for, but the selected layer shows none in any of its "
        f"{len(capture.calls)} calls ({where}); the fault may be in another layer "
        "(try reprokit.find) or may vanish under capture"
    )


def write_archive(
    record: CallRecord,
    *,
    out: str | os.PathLike,
    keypath: str,
    layer_type: str,
    mode: str,
    call_count: int = 1,
    note: str = "",
    signature: str | None = None,
    allow_modules: tuple[str, ...] | list[str] = (),
    extra_manifest: dict | None = None,
    check: bool = True,
    redact: Any = None,
    max_size: str | int | None = None,
    bundle_code: bool = False,
    signature_info: dict | None = None,
    describe_array: Any = None,
    extra_members: list[tuple[str, bytes]] | tuple = (),
    compress: bool = False,
) -> PackResult:
    """Writes one captured call as an archive (the part of `pack` after capture).

    `extra_manifest` adds JSON fields to the manifest (e.g. how the layer was
    found); they must not collide with the format's own fields. `redact`,
    `max_size`, `bundle_code` and `compress` are described in `pack`. For multi-process
    captures (`reprokit.capture._multihost`): `signature_info` is the recorded issue
    decided without reading the outputs, `describe_array(value)` returns an
    array's (descriptor, payload or None), and `extra_members` are added as
    (name, bytes).
    """
    out = os.fspath(out)
    try:
        sig = signature_info or detect_signature(record.outcome, signature)
    except ValueError as error:
        raise UsageError(str(error)) from None
    allow = tuple(allow_modules)
    bundle = None
    if bundle_code:
        from reprokit.record import _bundle

        bundle = _bundle.prepare(_record_parts(record), allow)
        allow += tuple(m for m in bundle.modules if m not in allow)
    aliases = bundle.aliases if bundle is not None else None
    redaction = None
    spec = _redact.parse_redactions(redact)
    limit = _redact.parse_size(max_size)
    if spec:
        record, redaction = _redact.redact(record, sig, spec, mode)
        sig = detect_signature(record.outcome, sig["kind"] if redaction["reproduces"] else None)
    size_fit = None
    if limit is not None:

        def encode(candidate):
            trial_arrays: list[Any] = []
            encoded = _encode_record(
                candidate, trial_arrays, allow, all_fills=True, module_aliases=aliases
            )
            return encoded, trial_arrays

        record, size_fit = _redact.fit(record, sig, mode, limit, encode)
        size_fit["max_size"] = limit
    if sig["kind"] == "exception":
        sig["message"] = _format.printable(scrub_text(sig["message"]))
    arrays: list[Any] = []
    tree = _encode_record(
        record,
        arrays,
        allow,
        all_fills=bool(spec) or limit is not None or compress,
        module_aliases=aliases,
        describe_array=describe_array,
    )
    manifest = {
        "format": _format.FORMAT_NAME,
        "format_version": _format.FORMAT_VERSION,
        "reprokit_version": _format.reprokit_version(),
        "created": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "note": _format.printable(scrub_text(note or "")),
        "layer": {"keypath": keypath, "type": layer_type},
        "call": {"index": record.index, "count": call_count},
        "mode": mode,
        "signature": sig,
        "exception_traceback": [
            _format.printable(scrub_text(line))
            for line in (record.exception or {}).get("traceback", [])
        ],
        "modules": sorted(_needed_modules(tree["record"])),
        "arrays": {"count": len(arrays), "bytes": sum(d["nbytes"] for d in tree["arrays"])},
        "environment": capture_environment(),
        "contents": _contents(record, redaction),
    }
    if redaction is not None:
        manifest["redaction"] = redaction
    if size_fit is not None:
        manifest["size_fit"] = {k: v for k, v in size_fit.items() if k != "estimated_size"}
    if bundle is not None:
        manifest["code"] = bundle.section
    stablehlo = None
    if record.exception is None:
        from reprokit.record import _stablehlo

        stablehlo, manifest["stablehlo"] = _stablehlo.export_layer(_record_parts(record))
    for key, value in (extra_manifest or {}).items():
        if key in manifest:
            raise ValueError(f"extra manifest field {key!r} collides with a format field")
        manifest[key] = value
    if size_fit:
        deflate = set(size_fit["compress"])
    elif compress:
        deflate = set(_redact.compression_plan(arrays)["compress"])
        manifest["compressed_arrays"] = len(deflate)
    else:
        deflate = set()
    members = [*(bundle.files if bundle is not None else ()), *extra_members]
    trust = bundle is not None and bool(bundle.files)
    self_check = _write(
        out, manifest, tree, arrays, stablehlo, allow if check else None, deflate, members, trust
    )
    return PackResult(
        path=out,
        signature=sig,
        keypath=keypath,
        layer_type=layer_type,
        call_index=record.index,
        call_count=call_count,
        mode=mode,
        array_count=len(arrays),
        array_bytes=manifest["arrays"]["bytes"],
        size=os.path.getsize(out),
        self_check=self_check,
        contents=manifest["contents"],
        bundled=tuple(name for name, _ in (bundle.files if bundle is not None else ())),
        filled_arrays=sum("fill" in desc for desc in tree["arrays"]),
    )


def _encode_record(
    record: CallRecord,
    arrays: list,
    allow: tuple[str, ...],
    *,
    all_fills: bool = False,
    module_aliases: dict[str, str] | None = None,
    describe_array: Any = None,
) -> dict:
    """Encodes a call; `arrays` receives each payload (None for an array stored as a fill).

    An array that repeats one element throughout (all zeros, all NaN) is stored
    as a descriptor without payload: always from `_MIN_FILL_BYTES` up, and at
    any size with `all_fills` (when redacting or fitting a size, where every
    byte counts). `module_aliases` renames script modules (`--bundle-code`);
    `describe_array` replaces `_arrays.describe` (a None payload: stored elsewhere).
    """
    seen: dict[int, int] = {}
    descriptors: list[dict] = []

    def on_array(value: Any, where: str) -> int:
        index = seen.get(id(value))
        if index is None:
            desc, data = (describe_array or describe)(value)
            if data is not None and (all_fills or data.nbytes >= _MIN_FILL_BYTES):
                element = repeated_element(data)
                if element is not None:
                    data = None
                    if any(element):
                        desc.update(fill="repeat", element=element.hex())
                    else:
                        desc["fill"] = "zeros"
            index = seen[id(value)] = len(arrays)
            arrays.append(data)
            descriptors.append(desc)
        return index

    parts = _record_parts(record)
    encoded = {
        name: _encoding.encode_tree(
            value, on_array, where=name, extra_modules=allow, module_aliases=module_aliases
        )
        for name, value in parts.items()
    }
    # Refuse at pack time what the loader would refuse at replay time.
    try:
        _encoding.decode_tree(
            {"$t": "tuple", "v": list(encoded.values())},
            _allowlist.AllowList(allow),
            lambda i: None,
        )
    except Exception as error:
        raise CaptureError(f"the record would not load again: {error}") from None
    return {"record": encoded, "arrays": descriptors}


def _needed_modules(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            name = item.get("type") or (item.get("name") if item.get("$t") == "fn" else None)
            if isinstance(name, str) and ":" in name and not _allowlist.default_modules(name):
                found.add(name.split(":")[0])
            stack.extend(v for k, v in item.items() if k != "$t")
    return found


def _record_parts(record: CallRecord) -> dict:
    parts = {
        "submodel": record.submodel,
        "argument": record.argument,
        "side_inputs": record.side_inputs,
        "initial_var_values": record.initial_var_values,
    }
    if record.exception is None:
        parts["output"] = record.output
        parts["final_var_values"] = record.final_var_values
    return parts


def _write(
    out: str,
    manifest: dict,
    tree: dict,
    arrays: list,
    stablehlo: bytes | None,
    check_with_modules: tuple[str, ...] | None,
    compress: set[int] = frozenset(),
    extra_members: list[tuple[str, bytes]] | tuple = (),
    trust_code: bool = False,
) -> dict | None:
    """Writes the archive; with `check_with_modules`, self-checks it before it is moved into place.

    `extra_members` (bundled code, a multi-process checkpoint) are added as
    (name, bytes); `trust_code` lets the self-check import bundled code.
    """
    from reprokit.views import _script

    structure = _encoding.pack_bytes(tree)
    with ArchiveWriter(out) as writer:
        writer.add_bytes(_format.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        writer.add_bytes(_format.STRUCTURE, structure)
        total = sum(data.nbytes for data in arrays if data is not None)
        with progress(total, "writing arrays", threshold=_PROGRESS_BYTES) as advance:
            for index, data in enumerate(arrays):
                if data is None:
                    continue  # a fill: its descriptor in the array table says it all
                if index in compress:
                    writer.add_bytes(_format.array_member(index), data.tobytes(), compress=True)
                else:
                    writer.add_buffer(_format.array_member(index), data)
                advance(data.nbytes)
        for name, data in extra_members:
            if name.endswith(".py"):
                writer.add_bytes(name, data, compress=True)
            else:
                writer.add_buffer(name, data)
        writer.add_bytes(
            _format.REPLAY_SCRIPT,
            _script.render_replay_script(manifest, tree).encode(),
            compress=True,
        )
        writer.add_bytes(_format.README, _script.render_readme(manifest).encode(), compress=True)
        writer.add_bytes(_format.REQUIREMENTS, _script.render_requirements(manifest).encode())
        if stablehlo is not None:
            writer.add_bytes(_format.STABLEHLO, stablehlo, compress=True)
        if check_with_modules is None:
            return None
        result = self_check(writer.snapshot(), check_with_modules, trust_code=trust_code)
        writer.add_bytes(_format.SELFCHECK, json.dumps(result, indent=1).encode())
    return result


def _contents(record: CallRecord, redaction: dict | None) -> dict:
    """What the archive holds, for the sharing note: parameter values, input shapes, redaction."""
    import jax
    from penzai import pz

    params = pz.select(record.submodel).at_instances_of(pz.ParameterValue).get_sequence()
    count = sum(leaf.size for p in params for leaf in jax.tree_util.tree_leaves(p.value) if hasattr(leaf, "size"))
    shapes = []
    for prefix, tree in (("argument", record.argument), ("side_inputs", record.side_inputs)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if hasattr(leaf, "shape"):
                shapes.append(f"{prefix}{jax.tree_util.keystr(path)}: {leaf.dtype}{list(leaf.shape)}")
    return {
        "parameter_values": int(count),
        "inputs": shapes[:20],
        "redacted": bool(redaction and (redaction.get("params") or redaction.get("inputs"))),
        "redaction": redaction,
    }


def _contents_lines(contents: dict | None) -> list[str]:
    if not contents:
        return []
    inputs = "; ".join(contents["inputs"][:4]) + (" ..." if len(contents["inputs"]) > 4 else "")
    lines = [
        f"  contains: {contents['parameter_values']:,} parameter values; inputs {inputs or '(none)'}; "
        + ("some values redacted" if contents["redacted"] else "no value redacted")
    ]
    if contents.get("redaction"):
        lines += _redact.describe(contents["redaction"])
    return lines
