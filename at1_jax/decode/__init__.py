"""Latents to pixels: the Flax VAE decoder, its diffusers weights, image arrays and PNGs."""
