"""What process 0 shows and records while training: progress bar, TensorBoard, W&B, and
RUN/scalars.jsonl (one JSON row per logged step: training scalars, validation losses)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from at1_jax.model.flops import peak_flops
from at1_jax.train import plots
from at1_jax.train.config import ConfigError

log = logging.getLogger(__name__)


def say(text: str) -> None:
    """Prints a line on process 0 only."""
    if jax.process_index() == 0:
        print(text, flush=True)


def describe_consumed(consumed: dict) -> str:
    """'N samples: licences a 1, b 2; sources s 3' of a Consumed.to_dict()."""

    def counts(d):
        return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"

    return (
        f"{consumed['samples']:,} samples: licences {counts(consumed['licenses'])}; "
        f"sources {counts(consumed['sources'])}"
    )


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


def trim_scalars(run_dir: str, last_step: int) -> None:
    """Drops the rows after `last_step` (logged before a kill, redone after the resume)."""
    rows = [r for r in plots.read_scalars(run_dir) if r.get("step", 0) <= last_step]
    path = os.path.join(run_dir, plots.SCALARS_FILE)
    if not os.path.isfile(path):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


class Reporter:
    """Progress bar, TensorBoard events, scalars.jsonl and optional W&B, on process 0 only."""

    def __init__(self, cfg, start_step: int, flops_per_step: float | None, config_dict: dict):
        self.enabled = jax.process_index() == 0
        self.cfg, self.every = cfg, cfg.log.every
        self.start_step, self.total = start_step, cfg.steps
        peak = peak_flops(jax.devices()[0])
        self.peak = peak * jax.device_count() if peak else None
        self.flops = flops_per_step
        self._t = time.perf_counter()
        self._t_step = start_step
        self.tb = self.wandb = self.bar = self.scalars = None
        self.last_val: dict | None = None
        if not self.enabled:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        trim_scalars(cfg.run_dir, start_step)
        self.scalars = open(os.path.join(cfg.run_dir, plots.SCALARS_FILE), "a")
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True)
        if cfg.log.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
        if cfg.log.wandb:  # check_backends() has checked that it is installed
            import wandb

            self.wandb = wandb.init(
                project=cfg.log.wandb_project, name=cfg.name, config=config_dict
            )

    def step(
        self, step: int, metrics: dict, val: dict | None = None, val_seconds: float = 0.0
    ) -> None:
        """Record the metrics of the step that just finished (`step` = steps done).

        `val`: the validation losses computed after it, which took `val_seconds` (left out
        of the step time).
        """
        if not self.enabled:
            return
        self.bar.update(step - self.bar.n)
        if step % self.every and step != self.total and val is None:
            return
        now = time.perf_counter()
        dt = (now - self._t - val_seconds) / max(step - self._t_step, 1)
        self._t, self._t_step = now, step
        if val is not None:
            self.last_val = val
        scalars = {k: float(v) for k, v in metrics.items() if np.asarray(v).dtype != bool}
        scalars["step_time_s"] = dt
        scalars["images_per_s"] = self.cfg.data.batch_size / dt
        if self.flops:
            scalars["tflops_per_s"] = self.flops / dt / 1e12
            if self.peak:
                scalars["mfu"] = self.flops / dt / self.peak
        shown = {"loss": f"{scalars['loss']:.4f}"}
        if self.last_val is not None:  # the latest validation, until the next one
            shown["val_loss_ema"] = f"{self.last_val['val_loss_ema']:.4f}"
        shown.update(img_s=f"{scalars['images_per_s']:.1f}", step_s=f"{dt:.2f}")
        if "mfu" in scalars:
            shown["mfu"] = f"{scalars['mfu']:.1%}"
        self.bar.set_postfix(**shown)
        tagged = {f"train/{k}": v for k, v in scalars.items()}
        tagged.update({f"val/{k.removeprefix('val_')}": v for k, v in (val or {}).items()})
        if self.tb:
            for k, v in tagged.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(tagged, step=step)
        row = {"step": step, **scalars, **(val or {})}
        if val is not None:
            row["val_time_s"] = val_seconds
        self.scalars.write(json.dumps(row) + "\n")
        self.scalars.flush()  # a kill leaves whole rows (plots skips a torn last line)

    def provenance(self, step: int, consumed: dict) -> None:
        """The samples trained on so far, by licence and source (at each checkpoint)."""
        if not self.enabled:
            return
        if self.tb:
            self.tb.add_scalar("data/samples", consumed["samples"], step)
            for k, v in consumed["licenses"].items():
                self.tb.add_scalar(f"data/license/{k}", v, step)
        log.info("step %d: trained on %s", step, describe_consumed(consumed))

    def plot(self) -> None:
        """Redraws RUN/curves.png from scalars.jsonl."""
        if self.enabled:
            plots.write_plot(self.cfg.run_dir, self.cfg.name)

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
        self.scalars.close()
        self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
