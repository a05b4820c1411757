"""Benchmarks of statekv (figures, not timed tests): `statekv.benchmarks.prefill` compares prefill policies."""
