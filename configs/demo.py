"""The CPU demo (python -m at1_jax.demo): a small pixel-space denoiser on synthetic shapes.

32×32 RGB "latents" (the pixel autoencoder), 384-d MiniLM text vectors, 4 fake CPU devices
as a 2×2 (data, fsdp) mesh. The demo sets data.path, run_dir, steps and the latent/text
sizes from the encoded dataset.
"""

from at1_jax.config import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)
from at1_jax.diffusion import ObjectiveConfig
from at1_jax.model import DenoiserConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="demo",
        run_dir="outputs/demo/run",
        steps=1500,
        model=DenoiserConfig(
            latent_size=32,
            latent_channels=3,
            patch_size=4,
            width=128,
            depth=4,
            noise_embed_dims=128,
            text_dim=384,
            cross_heads=None,
            block="prenorm",
        ),
        # TLD's noise distribution: mostly low noise, where shapes and colours are settled.
        objective=ObjectiveConfig(beta_a=1.0, beta_b=2.5, cfg_drop=0.1),
        data=DataConfig(path="outputs/demo/data", batch_size=64, shuffle_shards=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=100, clip_norm=1.0, ema_decay=0.995),
        mesh=MeshConfig(data=2, fsdp=2),
        checkpoint=CheckpointConfig(every=250, keep=2),
        log=LogConfig(every=25, sample_every=500, sample_steps=20, sample_guidance=3.0),
    )
