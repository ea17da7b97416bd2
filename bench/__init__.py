"""Benchmarks of piccolo_jax, run as modules from the repository root: python -m bench.NAME (see README)."""
