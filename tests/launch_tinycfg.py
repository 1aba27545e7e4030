"""A tiny training config for the launcher tests; paths come from --config overrides."""

import dataclasses

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
        name="launch-test",
        run_dir="runs/launch-test",
        steps=4,
        seed=1,
        model=dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=32),
        data=DataConfig(path="", batch_size=8, shuffle_shards=2, streams=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        mesh=MeshConfig(data=2, fsdp=2, min_fsdp_mib=0),  # split every weight: tests FSDP
        checkpoint=CheckpointConfig(every=2, keep=2),
        log=LogConfig(every=1, tensorboard=False, vae="none"),
    )
