"""Benchmark records (bench.json): schema validation, image grids, SQNR plots and summary tables."""
