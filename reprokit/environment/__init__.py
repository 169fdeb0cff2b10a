"""The environment a bug was packed in: recorded without secrets, restored with care.

Snapshot (versions, devices, jax config, XLA flags), scrubbing of anything
private, restoring the reviewed jax config and XLA flags on replay, and the
table that says how two environments differ.

Rule (tested): never imports capture, replay, views, the CLI or templates.
"""
