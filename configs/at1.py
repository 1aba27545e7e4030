"""The AT-1 run: the 23M `legacy` denoiser, Beta(0.75, 0.75) noise, EMA 0.999, bf16 where fast.

AT-1 ran global batches of 960–6,656 over 15–26 A100s; this starts at 960 with FSDP over
all devices of a process group. Point data.path and checkpoint.dir at S3 for clusters.
"""

import dataclasses

from at1_jax.model.objective import AT1_OBJECTIVE
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
        name="at1",
        run_dir="runs/at1",
        steps=200_000,
        model=dataclasses.replace(PRESETS["at1"], dtype="auto"),
        objective=AT1_OBJECTIVE,
        data=DataConfig(path="s3://at1-data/latents", batch_size=960, shuffle_shards=8),
        optim=OptimConfig(lr=3e-4, warmup_steps=1000, ema_decay=0.999),
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(dir="s3://at1-checkpoints/at1", every=2000, keep=3),
        log=LogConfig(every=50, sample_every=5000, sample_steps=40, sample_guidance=4.5),
    )
