"""Benchmarks (`pycompress bench ...`)."""
