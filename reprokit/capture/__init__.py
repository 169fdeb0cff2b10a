"""The reporter's side: capture a misbehaving layer inside a real run and pack it.

Capture, pack options, pack, the multi-process path, target loading for the
CLI, `find`, `watch`, redaction and the pack-time self-check. Everything here
runs inside someone's failing run, so it must leave their model, its state
and the jax config exactly as it found them.

Rule (tested): nothing on the loader/replay side imports this package.
"""
