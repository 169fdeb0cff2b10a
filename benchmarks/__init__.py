"""reprokit's benchmarks: ratios against baselines measured in the same run.

Not tests and not part of the installed package. `python -m benchmarks`
runs the storage benchmark of issue 6 (`benchmarks.run`);
`benchmarks/bench_find_watch.py` measures `find` and `watch`.
"""
