"""Example: a `flax.linen` model whose LayerNorm is off against float64, found, packed, replayed.

Why this exists: most JAX models are Flax models. penzai's own bridge,
`penzai.toolshed.unflaxify`, turns a linen module and its variables into a
penzai layer tree (one `InterceptedFlaxModuleMethod` per submodule call), and
reprokit works on that tree like on any penzai model. Here the encoder's
residual stream sits far from zero, and `nn.LayerNorm`'s default fast
variance (E[x^2] - E[x]^2 in float32) cancels: its output is wrong by
hundreds of percent against a float64 run. `reprokit.search` with
`check="mismatch"` names the culprit as Flax names it (`Encoder/LayerNorm_0`),
packs it, and the archive replays bitwise anywhere flax is installed.

    pip install 'reprokit[flax]'
    python examples/flax_layernorm.py [--out flax-layernorm.repro.zip]

or from the shell, selecting the layer by its Flax path:

    reprokit pack examples/flax_layernorm.py:make_call --list
    reprokit pack examples/flax_layernorm.py:make_call --select Encoder/LayerNorm_0 \\
        -o flax-layernorm.repro.zip

Then `reprokit run flax-layernorm.repro.zip --reference float64` shows the
error; `nn.LayerNorm(use_fast_variance=False)` is the fix to try in replay.py.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
from penzai.toolshed import unflaxify

OFFSET = 1000.0  # where the residual stream drifted


class Encoder(nn.Module):
    """Dense projection, a residual stream far from zero, LayerNorm, MLP head."""

    features: int = 32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features)(x) + OFFSET
        h = nn.LayerNorm()(h)
        return nn.Dense(8)(nn.gelu(h))


def make_call():
    """(model, argument) for `reprokit pack examples/flax_layernorm.py:make_call ...`."""
    module = Encoder()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    variables = module.init(jax.random.key(1), x)
    model = unflaxify.unflaxify_apply(module, variables, x)
    return model, unflaxify.ArgsAndKwargs.capture(x)


def main() -> None:
    import reprokit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="flax-layernorm.repro.zip")
    args = parser.parse_args()
    model, argument = make_call()
    found = reprokit.search(model, argument, check="mismatch")
    print(found.report)
    result = found.pack(args.out, note="LayerNorm output far from its float64 value")
    print(result.summary())
    verdict = reprokit.replay(args.out)
    print("replayed:", "reproduced" if verdict.reproduced else "NOT reproduced")


if __name__ == "__main__":
    main()
