"""Generation: the sampling pipeline, model and prompt loading, and the sample CLI."""
