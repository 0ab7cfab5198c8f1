"""Benchmarks that measure facefed end to end (run as modules, e.g. ``python -m bench.accuracy``)."""
