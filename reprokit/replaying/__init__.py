"""The maintainer's side: rebuild an archive's layer and replay it.

Named `replaying`, not `replay`, because `reprokit.replay` is the public function.

Loading (decode under the allow-list, arrays into aligned buffers, sharding
placement), replay and its verdict, variants (repeats, sweeps, references,
StableHLO) and the HTML view of a loaded layer.

Rule (tested): never imports capture, the CLI or templates; opens archives
only through `reprokit.archive`.
"""
