"""The record: a captured call turned into plain data, and plain data turned back into objects.

Encoding of pytree structure as msgpack nodes (types and callables named,
never pickled), the reporter's bundled code, and the StableHLO export of the
layer. Decoding resolves names only through the archive layer's allow-list.

Rule (tested): never imports capture, replay, views, the CLI or templates.
"""
