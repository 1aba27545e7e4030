"""A run's record: what a resume or rerun may change, RUN/config.json, its newest intact meta."""

from __future__ import annotations

import json
import logging
import os

from at1_jax.checkpointing import checkpoints as checkpoint
from at1_jax.model.denoiser import NUMERICS
from at1_jax.train import config

log = logging.getLogger(__name__)

# Config fields that shape the trained weights. Mesh, checkpointing, logging and process
# settings may change on resume and mean nothing to a finished run.
_RESULT_FIELDS = ("seed", "steps")
_RESULT_SECTIONS = ("model.", "objective.", "data.", "optim.")
_NOT_RESULT = ("data.prefetch", "data.val_path", "data.licenses")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(old: dict, new: dict, keep) -> list[str]:
    keys = sorted(k for k in old.keys() | new.keys() if keep(k))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def config_changes(saved: dict, cfg: config.TrainConfig) -> list[str]:
    """'field old -> new' for every field that shapes the weights and differs from `saved`."""
    new = _flat(json.loads(config.to_json(cfg)))

    def keep(k):
        return (k in _RESULT_FIELDS or k.startswith(_RESULT_SECTIONS)) and k not in _NOT_RESULT

    return _differences(_flat(saved), new, keep)


def layout_changes(saved: dict, cfg: config.TrainConfig) -> list[str]:
    """Differences that give the train state other arrays: architecture, clipping on/off."""
    new = _flat(json.loads(config.to_json(cfg)))

    def keep(k):
        return k.startswith("model.") and k.split(".", 1)[1] not in NUMERICS

    found = _differences(_flat(saved), new, keep)
    clip_before = bool(saved.get("optim", {}).get("clip_norm"))
    if clip_before != bool(cfg.optim.clip_norm):
        found.append(
            f"optim.clip_norm {saved['optim']['clip_norm']!r} -> {cfg.optim.clip_norm!r} "
            "(clipping on/off changes the optimizer state)"
        )
    return found


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_config(cfg: config.TrainConfig) -> None:
    """RUN/config.json: the config this run trains with (replaced whole, never half-written)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    _write_atomic(os.path.join(cfg.run_dir, "config.json"), config.to_json(cfg))


def newest_meta(ckpts: checkpoint.Checkpoints) -> tuple[int, dict]:
    """(step, metadata) of the newest step whose metadata matches its checksum."""
    for step in reversed(ckpts.steps()):
        try:
            return step, ckpts.restore_meta(step)
        except checkpoint.CorruptCheckpoint as e:
            log.warning("%s; trying the previous complete step", e)
    raise checkpoint.CheckpointError(f"no checkpoint in {ckpts.path} has intact metadata")


def refuse_changes_to_finished(cfg, latest: int, changes: list[str]) -> None:
    """A run with no step left trains nothing: settings it cannot apply are an error."""
    if changes:
        raise config.ConfigError(
            f"{cfg.checkpoint_dir} already holds step {latest} and config.steps={cfg.steps}: "
            f"nothing is left to train, so these changes cannot apply: {'; '.join(changes)}. "
            f"Nothing was trained and {cfg.run_dir}/config.json is unchanged. Raise "
            f"config.steps above {latest} to continue this run with them, or train them in a "
            "new run_dir"
        )
