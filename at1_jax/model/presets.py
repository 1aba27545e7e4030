"""Named denoiser sizes: the published TLD / AT-1 models and a larger one for scale work."""

from at1_jax.model.denoiser import DenoiserConfig

PRESETS: dict[str, DenoiserConfig] = {
    # TLD's test default: 868,800 parameters.
    "tld-tiny": DenoiserConfig(
        latent_size=16, width=128, depth=3, noise_embed_dims=256, cross_heads=None, block="prenorm"
    ),
    # AT-1, final released line: 23,049,536 parameters.
    "at1": DenoiserConfig(
        latent_size=32, width=512, depth=6, noise_embed_dims=128, cross_heads=4, block="legacy"
    ),
    # TLD's released 101M weights: 101,164,352 parameters.
    "tld-101m": DenoiserConfig(
        latent_size=32, width=768, depth=12, noise_embed_dims=256, cross_heads=4, block="legacy"
    ),
    # PixArt-XL's width (1152) at 32 blocks: ~0.6B parameters, for scaling/sharding work.
    "xl-600m": DenoiserConfig(
        latent_size=32,
        width=1152,
        depth=32,
        noise_embed_dims=256,
        cross_heads=None,
        block="prenorm",
    ),
}


def get_preset(name: str) -> DenoiserConfig:
    """The preset's config, or a ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
