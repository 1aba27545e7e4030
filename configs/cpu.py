"""A CPU-sized run: the TLD test-size denoiser, FSDP over however many CPU devices there are.

Latent and text sizes come from the data set's manifest. One device works as it is; for a
sharded run on one machine, fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import dataclasses

from at1_jax.model.objective import ObjectiveConfig
from at1_jax.model.presets import PRESETS
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
        name="cpu",
        run_dir="runs/cpu",
        steps=500,
        # "auto": bfloat16 compute on CPUs with bfloat16 dot products (~1.7× the float32 step).
        model=dataclasses.replace(PRESETS["tld-tiny"], dtype="auto"),
        objective=ObjectiveConfig(beta_a=1.0, beta_b=2.5, cfg_drop=0.15),
        data=DataConfig(path="data/cpu", batch_size=32, shuffle_shards=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=50, clip_norm=1.0, ema_decay=0.99),
        mesh=MeshConfig(data=1, fsdp=-1),  # any device count that divides the batch of 32
        checkpoint=CheckpointConfig(every=100, keep=2),
        log=LogConfig(every=10, sample_every=250, sample_steps=20, num_samples=8),
    )
