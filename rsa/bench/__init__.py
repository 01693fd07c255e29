"""`rsa bench`: the grid, its measurements (via bench/test_bench_grid.py), report and plots."""
