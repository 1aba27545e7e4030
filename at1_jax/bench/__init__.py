"""Benchmarks of the model, the sharded train step and the sampler."""
