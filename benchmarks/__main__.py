"""`python -m benchmarks`: the storage benchmark (see `benchmarks.run`)."""

from benchmarks.run import main

main()
