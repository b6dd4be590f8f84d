"""Benchmark grid: methods x datasets x seeds (with or without TPP) from one spec; see :mod:`.grid`."""
