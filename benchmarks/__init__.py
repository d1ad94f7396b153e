"""Benchmarks: `python -m benchmarks.run` prints the tables and writes BENCHMARKS.md."""
