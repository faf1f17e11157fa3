"""Benchmarks with their baselines run side by side: `stagemesh bench` (runner.py) and the GPU check
(gpu_check.sh). Each module says which rows it measures."""
