"""Code embedded verbatim into every archive's standalone `replay.py`.

`replay.py` must run where reprokit is not installed, and must decide what
reprokit decides. So the few functions both need (array descriptors and
rebuilding, the one way a layer is called, the verdict) live here once, and
`views._script` copies these files' source into the script.

Rule (tested): modules here import only the standard library, numpy and jax;
never reprokit (not even each other by package name: the script holds them
in one namespace).
"""
