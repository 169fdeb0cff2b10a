"""Where a replayed archive's arrays go: the recorded mesh, one device, or a mesh the maintainer names.

A reporter's parameters may be sharded over 8 GPUs or a TPU pod; the
maintainer replays on a laptop. Each array descriptor may record its
`NamedSharding` (mesh shape, axis names and types, partition spec, device
count: see `reprokit.portable._arrays.check_sharding`), and replay decides once, for
the whole archive, where arrays go:

* `auto` (the default): the recorded meshes when this machine has enough
  devices for all of them, else every array on one device;
* `recorded`: the recorded meshes, or refuse (`ReplayError`) when there are
  too few devices;
* `1` (or `single`): every array on the default device;
* `AXIS=SIZE,...` (e.g. `data=1,model=2`): one new mesh; each recorded
  partition spec keeps the axes this mesh has and replicates over the rest.

The decision is reported (`Topology`), so a verdict always says on which
topology the bug did or did not reproduce: on CPU, sharded and one-device
results are usually bitwise equal, on accelerators they often are not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from reprokit._errors import ReplayError, UsageError


@dataclasses.dataclass(frozen=True)
class MeshRequest:
    """What the maintainer asked for with `--mesh` (kind: auto, recorded, single or named)."""

    kind: str = "auto"
    axes: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        if self.kind == "named":
            return ",".join(f"{name}={size}" for name, size in self.axes)
        return self.kind


def parse_mesh(text: str | MeshRequest | None) -> MeshRequest:
    """Parses a `--mesh` value; raises UsageError saying what is accepted."""
    if isinstance(text, MeshRequest):
        return text
    if text is None or text.strip().lower() in ("", "auto"):
        return MeshRequest()
    value = text.strip().lower()
    if value == "recorded":
        return MeshRequest("recorded")
    if value in ("1", "single", "one"):
        return MeshRequest("single")
    axes: list[tuple[str, int]] = []
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
            raise UsageError(
                f"--mesh {text!r}: expected auto, recorded, 1, or AXIS=SIZE pairs such as "
                "data=2,model=4"
            )
        axes.append((name, int(size)))
    if len({name for name, _ in axes}) != len(axes):
        raise UsageError(f"--mesh {text!r} names an axis twice")
    return MeshRequest("named", tuple(axes))


def _mesh_key(sharding: dict) -> tuple:
    return (
        tuple(sharding["mesh_shape"]),
        tuple(sharding["axis_names"]),
        tuple(sharding["axis_types"]),
        tuple(sharding.get("device_ids") or ()),
    )


def mesh_text(axes: dict[str, int] | list | tuple) -> str:
    """{"data": 2, "model": 4} -> 'data=2 x model=4'."""
    items = axes.items() if isinstance(axes, dict) else axes
    return " x ".join(f"{name}={size}" for name, size in items)


def recorded_meshes(descriptors: list[dict]) -> list[dict]:
    """The distinct meshes the archive's arrays were sharded over, with how many arrays each."""
    meshes: dict[tuple, dict] = {}
    for desc in descriptors:
        sharding = desc.get("sharding")
        if not isinstance(sharding, dict):
            continue
        key = _mesh_key(sharding)
        if key not in meshes:
            meshes[key] = {
                "mesh": dict(zip(sharding["axis_names"], sharding["mesh_shape"], strict=True)),
                "axis_types": list(sharding["axis_types"]),
                "device_count": sharding["device_count"],
                "arrays": 0,
            }
        meshes[key]["arrays"] += 1
    return list(meshes.values())


class Placement:
    """Decides each array's sharding for one replay; `topology` says what was decided."""

    def __init__(self, descriptors: list[dict], request: MeshRequest | str | None = None):
        import jax

        self._request = parse_mesh(request)
        self._devices = list(jax.devices())
        self._recorded = recorded_meshes(descriptors)
        self._cache: dict[tuple, Any] = {}
        available = len(self._devices)
        needed = max((m["device_count"] for m in self._recorded), default=1)
        kind = self._request.kind
        self._named_mesh = None
        if not self._recorded:
            used = "single"
            reason = "the archive records no sharded arrays" + (
                f"; --mesh {self._request} has no effect" if kind != "auto" else ""
            )
        elif kind == "named":
            self._named_mesh = self._build_named_mesh()
            used, reason = "named", "--mesh " + str(self._request)
        elif kind == "single":
            used, reason = "single", "--mesh 1"
        elif available >= needed:
            used, reason = "recorded", f"this machine has {available} devices"
        elif kind == "recorded":
            raise ReplayError(
                f"--mesh recorded: the archive was sharded over {needed} devices, but this "
                f"machine has {available}; pass --mesh 1 or a smaller mesh such as "
                f"{self._suggestion(available)}"
            )
        else:
            used = "single"
            reason = (
                f"the recorded mesh needs {needed} devices and this machine has {available}; "
                "choose another with --mesh"
            )
        self._used = used
        if used == "named":
            mesh_axes = dict(self._request.axes)
            count = math.prod(mesh_axes.values())
        elif used == "recorded":
            mesh_axes = self._recorded[0]["mesh"] if len(self._recorded) == 1 else None
            count = needed
        else:
            mesh_axes, count = None, 1
        self.topology = {
            "used": used,
            "mesh": mesh_axes,
            "device_count": count,
            "platform": self._devices[0].platform,
            "available_devices": available,
            "recorded": self._recorded,
            "reason": reason,
        }

    def _suggestion(self, available: int) -> str:
        names = list(self._recorded[0]["mesh"]) if self._recorded else ["model"]
        return ",".join(
            f"{name}={available if i == len(names) - 1 else 1}" for i, name in enumerate(names)
        )

    def _build_named_mesh(self) -> Any:
        import jax
        import numpy as np

        axes = dict(self._request.axes)
        count = math.prod(axes.values())
        if count > len(self._devices):
            raise ReplayError(
                f"--mesh {self._request} needs {count} devices, but this machine has "
                f"{len(self._devices)}"
            )
        recorded_types: dict[str, str] = {}
        for mesh in self._recorded:
            recorded_types.update(zip(mesh["mesh"], mesh["axis_types"], strict=True))
        grid = np.empty(count, dtype=object)
        grid[:] = self._devices[:count]
        return jax.sharding.Mesh(
            grid.reshape(tuple(axes.values())),
            tuple(axes),
            axis_types=tuple(
                getattr(jax.sharding.AxisType, recorded_types.get(name, "Auto")) for name in axes
            ),
        )

    def sharding(self, desc: dict, index: int | None = None) -> Any:
        """The jax sharding for the array `desc` describes (None: the default device)."""
        recorded = desc.get("sharding")
        if recorded is None or self._used == "single":
            return None
        if self._used == "recorded":
            from reprokit.portable._arrays import named_sharding

            key = _mesh_key(recorded) + (tuple(map(str, recorded["spec"])),)
            if key not in self._cache:
                self._cache[key] = named_sharding(recorded, devices=self._devices)
            return self._cache[key]
        return self._named_sharding(desc, recorded, index)

    def _named_sharding(self, desc: dict, recorded: dict, index: int | None) -> Any:
        import jax

        mesh = self._named_mesh
        sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
        entries: list[Any] = []
        for dim, entry in enumerate(recorded["spec"]):
            axes = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
            kept = tuple(a for a in axes if a in sizes)
            split = math.prod(sizes[a] for a in kept)
            if desc["shape"][dim] % split:
                where = f"array {index}" if index is not None else "an array"
                raise ReplayError(
                    f"--mesh {self._request}: {where} has {desc['shape'][dim]} elements along "
                    f"dimension {dim}, which do not split evenly over {mesh_text([(a, sizes[a]) for a in kept])}"
                )
            entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))


def describe_topology(topology: dict | None) -> str | None:
    """One line for the verdict: which topology the replay used, and why."""
    if not topology:
        return None
    devices = topology["device_count"]
    platform = topology.get("platform") or "?"
    recorded = topology.get("recorded") or []
    was = (
        "; ".join(f"{mesh_text(m['mesh'])} ({m['device_count']} devices)" for m in recorded)
        or "one device"
    )
    if topology["used"] == "recorded":
        meshes = "; ".join(mesh_text(m["mesh"]) for m in recorded)
        return f"recorded mesh {meshes} restored on {devices} {platform} devices"
    if topology["used"] == "named":
        return (
            f"mesh {mesh_text(topology['mesh'])} ({topology['reason']}) on {devices} {platform} "
            f"devices; recorded on {was}"
        )
    return f"one {platform} device; recorded on {was} ({topology['reason']})"
