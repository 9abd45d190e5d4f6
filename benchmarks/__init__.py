"""Benchmarks: each script prints one JSON object (see _common.report) and runs as `python -m benchmarks.NAME`;
`--quick` is a smoke run of seconds, which tests/test_benchmarks_quick.py runs for every module here."""
