"""The CPU demo (python -m at1_demo): a small pixel-space denoiser on synthetic shapes.

32×32 RGB "latents" (the pixel autoencoder), 384-d MiniLM text vectors, 4 fake CPU devices
as a 2×2 (data, fsdp) mesh. The demo sets data.path, run_dir, steps and the latent/text
sizes from the encoded dataset.

Chosen for what 2 cores can learn in ~8 minutes: 8×8 patches (16 tokens, ~430 img/s; 4×4
patches ran 135 img/s and 800 steps learnt backgrounds only), 8 cross-attention heads
(more ways for the text token to steer each position), noise levels drawn from Beta(2, 1)
(density 2σ: the high-noise steps that decide the layout are trained more often; position
was learnt by step 2,000 instead of 3,000 with uniform levels), 3,000 steps (adherence on the
validation prompts 0.52 → 0.62 → 0.86 at 1,000, 2,000, 3,000 steps with uniform levels;
0.59 → 0.86 → 0.94 with Beta(2, 1); docs/demo.md). Generation settings are chosen on the
validation prompts (`python -m at1_demo.tune`), never on the held-out ones. The validation
loss (the first 256 held-out images at 5 noise levels) every 500 steps took ~1 s each
(4.7 s the first time, with its compile; val_time_s in RUN/scalars.jsonl).
"""

from at1_jax.model.denoiser import DenoiserConfig
from at1_jax.model.objective import ObjectiveConfig
from at1_jax.train.config import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="demo",
        run_dir="outputs/demo/run",
        steps=3000,
        model=DenoiserConfig(
            latent_size=32,
            latent_channels=3,
            patch_size=8,
            width=128,
            depth=4,
            noise_embed_dims=128,
            text_dim=384,
            cross_heads=8,
            block="prenorm",
        ),
        objective=ObjectiveConfig(beta_a=2.0, beta_b=1.0, cfg_drop=0.1),
        data=DataConfig(path="outputs/demo/data", batch_size=64, shuffle_shards=4),
        optim=OptimConfig(lr=2e-3, warmup_steps=100, clip_norm=1.0, ema_decay=0.995),
        mesh=MeshConfig(data=2, fsdp=2),
        checkpoint=CheckpointConfig(every=500, keep=2),
        log=LogConfig(
            every=25, sample_every=1000, sample_steps=20, sample_guidance=2.0, val_every=500
        ),
    )
