"""Benchmarks: `make bench` (python -m bench). Each prints ratios measured in the same run."""
