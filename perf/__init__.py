"""Benchmarks (run from the repository root: ``python -m perf.<script>``); helpers in perf.common."""
