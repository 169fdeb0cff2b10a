"""The archive layer: the `.repro.zip` container and every check that needs no jax.

Everything here reads or writes bytes and plain data: the zip container
(aligned writes, paranoid reads), the manifest schema and member names, the
grammar of the encoded record and its static checks, the member checks for
`code/` and `checkpoint/`, the allow-list's rules, the trust policy, and
`open_archive` / `verify`.

Rule (tested from the import graph): modules here import only the standard
library, numpy, msgpack and `reprokit._errors`; never jax, penzai, orbax,
jinja2 or any other part of reprokit. So `reprokit verify` and `inspect` of
a stranger's archive load no machine-learning code at all.
"""
