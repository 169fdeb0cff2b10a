"""A layer from the reporter's own importable module, packed: shared by tests of what a maintainer lacks.

Several tests need an archive that names a class from a module the
maintainer does not have (exit 5 from `replay.py`, `--json` on every exit
code). The module is written into a folder of its own, imported from there
for packing only, and left for the test to put on the path or not.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import models
from penzai import pz

import reprokit

_SOURCE = """
import dataclasses
import jax.numpy as jnp
from penzai import pz


@pz.pytree_dataclass
class {name}(pz.nn.Layer):
    axis: str = dataclasses.field(metadata={{"pytree_node": False}})

    def __call__(self, x, /, **side_inputs):
        return pz.nx.nmap(jnp.exp)(x * {factor})
"""


def pack_user_layer(folder: Path, module: str, name: str, factor: float, out: Path) -> Path:
    """Packs `module:name` (an overflowing exp) after an MLP; returns the module's source folder."""
    source = folder / "src"
    source.mkdir()
    (source / f"{module}.py").write_text(_SOURCE.format(name=name, factor=factor))
    sys.path.insert(0, str(source))
    try:
        layer_type = getattr(importlib.import_module(module), name)
        model = pz.nn.Sequential([models.mlp(), layer_type(axis="features")])
        reprokit.pack(
            pz.select(model).at_instances_of(layer_type),
            models.mlp_input(),
            out=out,
            check=False,
            quiet=True,
        )
    finally:
        sys.path.remove(str(source))
    return source
