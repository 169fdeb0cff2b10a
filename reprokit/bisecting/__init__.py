"""`reprokit bisect`: replay one archive under many releases of jax (or penzai, numpy, ml_dtypes).

Named `bisecting`, not `bisect`, because `reprokit.bisect` is the public function.

A maintainer's first two questions about an archive are "does it still
reproduce on the latest release?" and "which release introduced, or fixed,
it?". This package answers both: `_environments` builds one throwaway
environment per release with `uv` (cached, keyed by the resolved package
set), and `_bisect` renders a replay script from the verified record (never
the archive's own `replay.py`), runs it in each environment, and searches
the releases for the one change point.

Rule: sits above `replaying` and `views` (it renders with one and opens
archives with the other); nothing but the CLI and `reprokit.bisect` imports it.
"""
