"""What process 0 shows and records while training: progress bar, TensorBoard, W&B."""

from __future__ import annotations

import importlib.util
import logging
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from at1_jax.model.flops import peak_flops
from at1_jax.train.config import ConfigError

log = logging.getLogger(__name__)


def check_backends(cfg) -> None:
    """The logging packages the config asks for are importable: checked before any work."""
    if jax.process_index() != 0:  # only process 0 writes logs
        return
    wanted = [
        ("tensorboard", cfg.log.tensorboard, "tensorboardX", "tensorboardX"),
        ("wandb", cfg.log.wandb, "wandb", "wandb (the key is read from WANDB_API_KEY)"),
    ]
    for field, on, module, package in wanted:
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"config.log.{field}=true but {module} is not installed: pip install "
                f"{package}, or pass --config.log.{field}=false"
            )


class Reporter:
    """Progress bar, TensorBoard events and optional W&B, on process 0 only."""

    def __init__(self, cfg, start_step: int, flops_per_step: float | None, config_dict: dict):
        self.enabled = jax.process_index() == 0
        self.cfg, self.every = cfg, cfg.log.every
        self.start_step, self.total = start_step, cfg.steps
        peak = peak_flops(jax.devices()[0])
        self.peak = peak * jax.device_count() if peak else None
        self.flops = flops_per_step
        self._t = time.perf_counter()
        self._t_step = start_step
        self.tb = self.wandb = self.bar = None
        if not self.enabled:
            return
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True)
        if cfg.log.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
        if cfg.log.wandb:  # check_backends() has checked that it is installed
            import wandb

            self.wandb = wandb.init(
                project=cfg.log.wandb_project, name=cfg.name, config=config_dict
            )

    def step(self, step: int, metrics: dict) -> None:
        """Record the metrics of the step that just finished (`step` = steps done)."""
        if not self.enabled:
            return
        self.bar.update(step - self.bar.n)
        if step % self.every and step != self.total:
            return
        now = time.perf_counter()
        dt = (now - self._t) / max(step - self._t_step, 1)
        self._t, self._t_step = now, step
        scalars = {k: float(v) for k, v in metrics.items() if np.asarray(v).dtype != bool}
        scalars["step_time_s"] = dt
        scalars["images_per_s"] = self.cfg.data.batch_size / dt
        if self.flops:
            scalars["tflops_per_s"] = self.flops / dt / 1e12
            if self.peak:
                scalars["mfu"] = self.flops / dt / self.peak
        self.bar.set_postfix(
            loss=f"{scalars['loss']:.4f}",
            img_s=f"{scalars['images_per_s']:.1f}",
            step_s=f"{dt:.2f}",
            **({"mfu": f"{scalars['mfu']:.1%}"} if "mfu" in scalars else {}),
        )
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def image(self, step: int, grid_HWC: np.ndarray) -> None:
        if not self.enabled:
            return
        if self.tb:
            self.tb.add_image("samples", grid_HWC, step, dataformats="HWC")
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Image(grid_HWC)}, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
