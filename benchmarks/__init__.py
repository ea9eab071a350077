"""fastinterp's benchmark suite (pytest-benchmark files `bench_*.py`) and its report.

    python -m pytest benchmarks --benchmark-only --preset quick
    python -m benchmarks.report --preset quick --output bench-out
"""
