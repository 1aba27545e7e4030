"""Serving: the generation page and `POST /generate` over the sample pipeline, batched."""
