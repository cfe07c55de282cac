"""Benchmarks: always against stock TorchRec in the same run, reported as ratios."""
