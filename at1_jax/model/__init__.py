"""The denoiser: modules, presets, objective, samplers, weights I/O and FLOP accounting."""
