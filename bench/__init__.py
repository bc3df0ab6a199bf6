"""Benchmarks of sam_kernels: `python bench/run.py` (microbenchmarks + end-to-end), and
`pytest bench --benchmark-only` (pytest-benchmark suite). Not part of the installed package."""
