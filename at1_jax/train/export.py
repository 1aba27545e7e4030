"""Export the EMA weights to RUN/weights with dataset.json and model card, complete or absent."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import SafetensorError

from at1_jax.checkpointing import model_card
from at1_jax.model import weights
from at1_jax.train import config

WEIGHTS_DIR = "weights"


class RunFailure(RuntimeError):
    """An outside failure (disk full, storage down); fixing it and rerunning resumes."""


def export_ema(state: dict, cfg: config.TrainConfig, step: int, meta: dict) -> str:
    """Write the EMA weights to RUN/weights (gathered to process 0), complete or absent.

    `meta`: the metadata of the step's checkpoint: dataset.json and the model card come
    from it.
    """
    directory = os.path.join(cfg.run_dir, WEIGHTS_DIR)
    arrays = {"params": state["ema"], "buffers": state["buffers"]}
    host = multihost_utils.process_allgather(arrays, tiled=True)
    if jax.process_index() != 0:
        return directory
    flat = {}
    for part in ("params", "buffers"):
        for path, value in jax.tree_util.tree_leaves_with_path(host[part]):
            key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            flat[key] = np.asarray(value, np.float32)
    tmp, old = (os.path.join(cfg.run_dir, f".{WEIGHTS_DIR}.{s}") for s in ("tmp", "old"))
    try:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        weights.save(tmp, cfg.model, flat)
        with open(os.path.join(tmp, weights.DATASET_FILE), "w") as f:
            json.dump({**(meta.get("dataset") or {}), "step": step}, f, indent=2)
        model_card.write(tmp, model_card.from_training_meta(meta))
        if os.path.exists(directory):
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial files took
        raise RunFailure(
            f"writing the EMA weights of step {step} to {directory} failed: {e}. The checkpoint "
            f"of step {step} in {cfg.checkpoint_dir} is complete: fix this and rerun the same "
            "command to export them"
        ) from e
    return directory


def exported_step(run_dir: str) -> int | None:
    """The step of the EMA weights exported to RUN/weights, if any."""
    folder = os.path.join(run_dir, WEIGHTS_DIR)
    try:
        with open(os.path.join(folder, weights.DATASET_FILE)) as f:
            step = json.load(f).get("step")
    except (OSError, ValueError):
        return None
    return step if os.path.isfile(os.path.join(folder, weights.PARAMS_FILE)) else None
