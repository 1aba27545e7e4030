"""AT-1 / TLD latent transformer denoiser in JAX: model, diffusion, training, sampling."""
