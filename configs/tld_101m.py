"""TLD's 101M run: batch 256, Beta(1, 2.5) noise, Adam 3e-4, ~260k steps (32 h on one A100)."""

import dataclasses

from at1_jax.model.objective import TLD_OBJECTIVE
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
        name="tld-101m",
        run_dir="runs/tld-101m",
        steps=260_000,
        model=dataclasses.replace(PRESETS["tld-101m"], dtype="auto"),
        objective=TLD_OBJECTIVE,
        data=DataConfig(path="data/latents", batch_size=256, shuffle_shards=8),
        optim=OptimConfig(lr=3e-4, warmup_steps=1000, ema_decay=0.999),
        mesh=MeshConfig(data=-1, fsdp=1),
        checkpoint=CheckpointConfig(every=5000, keep=3),
        log=LogConfig(every=100, sample_every=10_000, sample_steps=40, sample_guidance=4.5),
    )
