"""`write_archive`: one captured call, encoded and written as a `.repro.zip`.

Every way of packing ends here once it holds the call to keep: `pack` (one
process), the multi-process path (`reprokit.capture._multihost`, process 0),
`find`/`watch` (`pack_found`) and the benchmarks. This module decides the
recorded issue, redacts and fits a size if asked, encodes the record,
assembles the manifest, streams the archive (with its self-check replay in a
fresh process), and renders the issue snippet from the manifest and
structure it just wrote, without reopening the archive. It lives apart from
`_pack` so that `_pack` and `_multihost` both build on it without importing
each other.
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
from reprokit.archive._trust import TrustPolicy
from reprokit.capture import _redact
from reprokit.capture._capture import CallRecord
from reprokit.capture._options import PackOptions
from reprokit.capture._selfcheck import describe as describe_self_check
from reprokit.capture._selfcheck import self_check
from reprokit.environment._scrub import scrub_text
from reprokit.environment._snapshot import capture_environment
from reprokit.portable._arrays import describe, repeated_element
from reprokit.portable._verdict import detect_signature
from reprokit.record import _encoding, _names
from reprokit.views import _script
from reprokit.views._issue import GITHUB_ATTACHMENT_LIMIT, write_issue_snippet

_PROGRESS_BYTES = 256 * 2**20  # smaller archives are written before a bar would be read
# Below this, a repeated-element array is stored as it is: a few bytes saved
# would not be worth a descriptor a reader of the archive must understand.
_MIN_FILL_BYTES = 64 * 2**10
# Deflate level of the text members (replay.py, README, bundled code): level 3
# takes a quarter of zlib's default level 6's time (2.4 ms against 0.6 ms for
# a small layer's replay.py, 32 against 10 ms for 10,000 NamedArrays') for
# a member about a tenth larger.
_TEXT_LEVEL = 3


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
    # The reporter's own modules a maintainer must install and allow (not bundled).
    user_modules: tuple[str, ...] = ()
    # The Flax module path (`Encoder/LayerNorm_0`) of a layer from penzai's unflaxify.
    flax_path: str | None = None

    def summary(self) -> str:
        """A few lines for the terminal: what was packed and how to replay it."""
        sig = _format.describe_signature(self.signature)
        name = os.path.basename(self.path)
        return "\n".join(
            [
                f"packed {self.layer_type} at {self.keypath}"
                + (f" (Flax module {self.flax_path})" if self.flax_path else "")
                + f" (call {self.call_index + 1} of "
                f"{self.call_count}, {self.mode}) into {self.path} ({_format.human_bytes(self.size)})",
                f"  recorded issue: {sig}",
                f"  arrays: {self.array_count} ({_format.human_bytes(self.array_bytes)})"
                + _fills_text(self.filled_arrays),
                f"  replay: reprokit run {name}"
                + (" --trust-code" if self.bundled else "")
                + "".join(f" --allow-module {m}" for m in self.user_modules),
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
                *_maintainer_lines(self.user_modules),
            ]
        )


def _maintainer_lines(modules: tuple[str, ...]) -> list[str]:
    if not modules:
        return []
    names = ", ".join(f"`{m}`" for m in modules)
    flags = " ".join(f"--allow-module {m}" for m in modules)
    return [
        f"  maintainers: install {names} and pass `{flags}`, or repack with `--bundle-code` "
        "(bundle_code=True)"
    ]


def _fills_text(count: int) -> str:
    if not count:
        return ""
    return f", {count} of them one value repeated (stored as fills, no bytes)"


def write_archive(
    record: CallRecord,
    *,
    out: str | os.PathLike,
    keypath: str,
    layer_type: str,
    mode: str,
    call_count: int = 1,
    flax_path: str | None = None,
    options: PackOptions | None = None,
    extra_manifest: dict | None = None,
    signature_info: dict | None = None,
    describe_array: Any = None,
    extra_members: list[tuple[str, bytes]] | tuple = (),
    stablehlo: tuple[bytes | None, dict] | None = None,
    issue_snippet: bool = True,
) -> PackResult:
    """Writes one captured call as an archive (the part of `pack` after capture).

    `options` are the caller's `PackOptions` (`call` and `mode` were used by
    the capture, not here). `extra_manifest` adds JSON fields to the manifest
    (e.g. how the layer was found); they must not collide with the format's
    own fields. For multi-process captures (`reprokit.capture._multihost`):
    `signature_info` is the recorded issue decided without reading the
    outputs, `describe_array(value)` returns an array's (descriptor, payload
    or None), and `extra_members` are added as (name, bytes). `stablehlo` is
    the layer's StableHLO export as `reprokit.record._stablehlo.export_layer`
    returns it, when the caller made it already (the benchmarks time the
    write path without it); None exports it here. `issue_snippet` writes
    `NAME.issue.md` beside the archive, rendered from what was written.
    """
    out = os.fspath(out)
    options = options or PackOptions()
    try:
        sig = signature_info or detect_signature(record.outcome, options.signature)
    except ValueError as error:
        raise UsageError(str(error)) from None
    allow = options.allow_modules
    bundle = None
    if options.bundle_code:
        from reprokit.record import _bundle

        bundle = _bundle.prepare(_record_parts(record), allow)
        allow += tuple(m for m in bundle.modules if m not in allow)
    aliases = bundle.aliases if bundle is not None else None
    redaction = None
    spec = _redact.parse_redactions(options.redact)
    limit = _redact.parse_size(options.max_size)
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
    names: set[str] = set()
    tree = _encode_record(
        record,
        arrays,
        allow,
        all_fills=bool(spec) or limit is not None or options.compress,
        module_aliases=aliases,
        describe_array=describe_array,
        names_out=names,
    )
    modules = _needed_modules(names)
    manifest = {
        "format": _format.FORMAT_NAME,
        "format_version": _format.FORMAT_VERSION,
        "reprokit_version": _format.reprokit_version(),
        "created": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "note": _format.printable(scrub_text(options.note or "")),
        "layer": {
            "keypath": keypath,
            "type": layer_type,
            **({"flax_path": flax_path} if flax_path else {}),
        },
        "call": {"index": record.index, "count": call_count},
        "mode": mode,
        "signature": sig,
        "exception_traceback": [
            _format.printable(scrub_text(line))
            for line in (record.exception or {}).get("traceback", [])
        ],
        "modules": sorted(modules),
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
    stablehlo_bytes = None
    if record.exception is None:
        if stablehlo is None:
            from reprokit.record import _stablehlo

            stablehlo = _stablehlo.export_layer(_record_parts(record))
        # The calling convention's shapes and dtype names are jax's, never the
        # reporter's text: only the rest (an error message) can quote a path.
        stablehlo_bytes, manifest["stablehlo"] = stablehlo[0], {
            key: value if key in ("in_avals", "out_avals") else _scrubbed(value)
            for key, value in stablehlo[1].items()
        }
    for key, value in (extra_manifest or {}).items():
        if key in manifest:
            raise ValueError(f"extra manifest field {key!r} collides with a format field")
        manifest[key] = value
    if size_fit:
        deflate = set(size_fit["compress"])
    elif options.compress:
        deflate = set(_redact.compression_plan(arrays)["compress"])
        manifest["compressed_arrays"] = len(deflate)
    else:
        deflate = set()
    members = [*(bundle.files if bundle is not None else ()), *extra_members]
    # The self-check replays as a maintainer who allows the reporter's modules
    # (named or found in the record) and, for bundled code, trusts it.
    reporter = _reporter_modules(modules, allow)
    trust = (
        TrustPolicy(allow + reporter, trust_code=bundle is not None and bool(bundle.files))
        if options.check
        else None
    )
    self_check = _write(
        out,
        manifest,
        tree,
        arrays,
        stablehlo_bytes,
        trust,
        deflate,
        members,
        needs_flax=_script.names_need_flax(names),
    )
    result = PackResult(
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
        user_modules=tuple(
            m
            for m in manifest["modules"]
            if not (bundle is not None and bundle.files and m in bundle.modules)
        ),
        flax_path=flax_path,
    )
    if not issue_snippet:
        return result
    # Rendered from what was written (the manifest as JSON read back in
    # memory, the structure as the tree that was serialised: it holds only
    # lists, maps and plain values, which msgpack returns unchanged), never by
    # reopening the archive. Parsing the structure again cost a second per
    # 10,000 NamedArray leaves.
    written = json.loads(json.dumps(manifest, sort_keys=True))
    structure = tree
    return dataclasses.replace(
        result,
        issue_path=write_issue_snippet(
            out, manifest=written, structure=structure, self_check=self_check
        ),
    )


def _encode_record(
    record: CallRecord,
    arrays: list,
    allow: tuple[str, ...],
    *,
    all_fills: bool = False,
    module_aliases: dict[str, str] | None = None,
    describe_array: Any = None,
    names_out: set[str] | None = None,
) -> dict:
    """Encodes a call; `arrays` receives each payload (None for an array stored as a fill).

    An array that repeats one element throughout (all zeros, all NaN) is stored
    as a descriptor without payload: always from `_MIN_FILL_BYTES` up, and at
    any size with `all_fills` (when redacting or fitting a size, where every
    byte counts). `module_aliases` renames script modules (`--bundle-code`);
    `describe_array` replaces `_arrays.describe` (a None payload: stored elsewhere).
    `names_out` receives every class and function name the encoded record names.
    """
    seen: dict[int, int] = {}
    descriptors: list[dict] = []

    def on_array(value: Any) -> int:
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
    # The encoder reports the names it writes: no walk of the encoded tree for them.
    names: set[str] = set()
    encoded = {
        name: _encoding.encode_tree(
            value,
            on_array,
            where=name,
            extra_modules=allow,
            module_aliases=module_aliases,
            names_out=names,
        )
        for name, value in parts.items()
    }
    modules = _needed_modules(names)
    # Refuse at pack time what the loader would refuse at replay time, but for
    # the reporter's own modules: their code on their machine is trusted.
    try:
        _encoding.decode_tree(
            {"$t": "tuple", "v": list(encoded.values())},
            _allowlist.AllowList(allow + _reporter_modules(modules, allow)),
            lambda i: None,
        )
    except Exception as error:
        raise CaptureError(f"the record would not load again: {error}") from None
    if names_out is not None:
        names_out.update(names)
    return {"record": encoded, "arrays": descriptors}


def _needed_modules(names: set[str]) -> set[str]:
    """The user modules among the class and function names a record names, beside the allow-list's."""
    return set(_names.outside_defaults(names))


def _reporter_modules(needed: set[str], allow: tuple[str, ...]) -> tuple[str, ...]:
    """The reporter's own modules among `needed` (an encoded record's) that `allow` does not cover.

    Imported in this process and admissible by `--allow-module` (never the
    standard library, jax, numpy, penzai or flax): the reporter's code on the
    reporter's machine needs no flag at pack time. Maintainers stay as strict
    as ever; the manifest's `modules` and the summary tell them what to allow.
    """
    import sys

    allowed = _allowlist.AllowList(allow)
    found = []
    for module in sorted(needed):
        if allowed.allows_module(module) or module not in sys.modules:
            continue
        if module.split(".")[0] in ("penzai", "flax") or not _allowlist.is_public_module(module):
            continue
        try:
            _allowlist.AllowList((module,))
        except Exception:
            continue
        found.append(module)
    return tuple(found)


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
    # A gradient issue (`pack(grad=...)`, reprokit.capture._grad_pack) also
    # records the backward pass: the cotangent at the output, the gradients.
    if getattr(record, "gradients", None) is not None:
        parts["output_cotangent"] = list(record.output_cotangent)
        parts["gradients"] = dict(record.gradients)
    return parts


def _write(
    out: str,
    manifest: dict,
    tree: dict,
    arrays: list,
    stablehlo: bytes | None,
    check_with: TrustPolicy | None,
    compress: set[int] = frozenset(),
    extra_members: list[tuple[str, bytes]] | tuple = (),
    *,
    needs_flax: bool = False,
) -> dict | None:
    """Writes the archive; with `check_with`, self-checks it before it is moved into place.

    `extra_members` (bundled code, a multi-process checkpoint) are added as
    (name, bytes); `check_with` is the trust the self-check replays with (the
    reporter's modules, and their bundled code). `needs_flax`: the record
    names Flax, so requirements.txt pins it.
    """
    structure = _encoding.pack_bytes(tree)
    with ArchiveWriter(out) as writer:
        writer.add_bytes(_format.MANIFEST, _format.manifest_text(manifest).encode())
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
                writer.add_bytes(name, data, compress=True, level=_TEXT_LEVEL)
            else:
                writer.add_buffer(name, data)
        writer.add_bytes(
            _format.REPLAY_SCRIPT,
            _script.render_replay_script(manifest, tree).encode(),
            compress=True,
            level=_TEXT_LEVEL,
        )
        writer.add_bytes(
            _format.README,
            _script.render_readme(manifest).encode(),
            compress=True,
            level=_TEXT_LEVEL,
        )
        writer.add_bytes(
            _format.REQUIREMENTS, _script.render_requirements(manifest, flax=needs_flax).encode()
        )
        if stablehlo is not None:
            writer.add_bytes(_format.STABLEHLO, stablehlo, compress=True)
        if check_with is None:
            return None
        result = self_check(writer.snapshot(), check_with)
        # Its reasons and errors quote paths (the snapshot's, the reporter's files).
        writer.add_bytes(_format.SELFCHECK, json.dumps(_scrubbed(result), indent=1).encode())
    return result


def _scrubbed(value: Any) -> Any:
    """`value` with every string scrubbed: error strings stored in an archive quote the
    reporter's paths, user and host names (SECURITY.md, class 5)."""
    if isinstance(value, str):
        return _format.printable(scrub_text(value))
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(item) for item in value]
    return value


def _contents(record: CallRecord, redaction: dict | None) -> dict:
    """What the archive holds, for the sharing note: parameter values, input shapes, redaction."""
    import jax
    from penzai import pz

    params = pz.select(record.submodel).at_instances_of(pz.ParameterValue).get_sequence()
    count = sum(leaf.size for p in params for leaf in jax.tree_util.tree_leaves(p.value) if hasattr(leaf, "size"))
    shapes = []
    for prefix, tree in (("argument", record.argument), ("side_inputs", record.side_inputs)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            # Only the first 20 are kept: formatting the rest costs per leaf for nothing.
            if hasattr(leaf, "shape") and len(shapes) < 20:
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
