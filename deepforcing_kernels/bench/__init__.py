"""Benchmark helpers shipped inside the package (the ``deepforcing bench`` command uses them; ``benchmarks/``
holds pytest-benchmark suites that call them)."""
