"""Orbax checkpoints of training runs, local or on S3."""
