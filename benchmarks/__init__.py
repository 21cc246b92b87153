"""fastchar benchmarks: run as `python -m benchmarks.NAME` from the repository root, or `fastchar bench`."""
