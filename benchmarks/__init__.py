"""Reproducible benchmarks: `python -m benchmarks --help`. Results go to benchmarks/RESULTS.md."""
