"""Benchmarks: `python -m grain_jax.bench <name> [flags]`; each prints its figures."""
