"""Benchmarks: each script prints one JSON object (see _common.report) and runs as `python -m benchmarks.NAME`."""
