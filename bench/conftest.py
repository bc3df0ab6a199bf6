"""pytest-benchmark suite (`pytest bench --benchmark-only`); not part of the default test run
(pyproject's testpaths is tests/). Needs `pip install pytest-benchmark`; without it the bench
modules skip themselves."""
