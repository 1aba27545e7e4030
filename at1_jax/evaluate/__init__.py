"""Evaluation: FID (Inception features), CLIP score and the evaluate CLI."""
