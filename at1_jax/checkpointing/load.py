"""Load a trained model and what its data set says about using it, from any place it lives."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from flax import nnx

from at1_io import storage
from at1_io.dataset_facts import generation_facts
from at1_jax.checkpointing import card_text, checkpoints, model_card
from at1_jax.model import weights
from at1_jax.model.denoiser import Denoiser

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "at1_jax")
MANIFEST_FILE = "manifest.json"  # a data set's manifest, optionally put next to weights


class MissingFiles(Exception):
    """A model or data file the command needs is not there; the message says what to do."""


def _fetch(url: str, names: tuple[str, ...], cache_dir: str, required: bool) -> str:
    """Copies files of an s3:// folder into the cache (once); returns the local folder."""
    local = os.path.join(cache_dir, "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    for name in names:
        dst = os.path.join(local, name)
        if os.path.isfile(dst):
            continue
        src = storage.join(url, name)
        if not storage.exists(src):
            if required:
                raise MissingFiles(f"checkpoint {url}: {name} not found there")
            continue
        storage.get_file(src, dst)
    return local


def _latest_meta(path: str) -> tuple[str, dict]:
    """(checkpoint folder, newest intact metadata) of a run or checkpoint folder."""
    folder = path
    if not storage.is_s3(path) and os.path.isdir(os.path.join(path, "checkpoints")):
        folder = os.path.join(path, "checkpoints")
    try:
        ck = checkpoints.Checkpoints(folder, read_only=True, async_save=False)
        try:
            found = ck.latest_meta()
        finally:
            ck.close()
    except checkpoints.CheckpointError as e:  # storage down, or every step corrupt
        raise MissingFiles(f"cannot load checkpoint {path}: {e}") from e
    if found is None:
        raise MissingFiles(
            f"checkpoint {path} not found or incomplete: it is neither an at1-jax weights "
            f"folder ({weights.CONFIG_FILE} + {weights.PARAMS_FILE}) nor a training run / "
            "checkpoint folder with a complete step. `python -m at1_jax.convert import "
            "TLD.pth DIR` makes a weights folder from TLD/AT-1 weights."
        )
    return folder, found[1]


def _from_checkpoints(path: str, numerics: dict[str, Any]) -> tuple[Denoiser, dict[str, Any]]:
    """EMA weights of the latest intact step in a run (`path`/checkpoints) or its folder."""
    folder, latest = _latest_meta(path)
    cfg = weights.config_from_dict(latest["config"]["model"], f"{folder} step {latest['step']}")
    cfg = dataclasses.replace(cfg, **numerics)
    graphdef, params, buffers = nnx.split(
        nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0))), nnx.Param, ...
    )
    abstract = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
    # The facts come from the step actually restored: it is older when newer arrays are corrupt.
    try:
        restored, meta = checkpoints.restore_params(folder, abstract)
    except checkpoints.CheckpointError as e:
        raise MissingFiles(f"cannot load checkpoint {path}: {e}") from e
    model = nnx.merge(graphdef, restored["params"], restored["buffers"])
    facts = generation_facts(meta.get("dataset") or {}, cfg.text_dim)
    summary = model_card.from_training_meta(meta)["summary"]  # what its export would say
    return model, {"source": "checkpoint", "step": meta["step"], **facts, "summary": summary}


def _is_weights_folder(path: str) -> bool:
    return all(
        storage.exists(storage.join(path, n)) for n in (weights.CONFIG_FILE, weights.PARAMS_FILE)
    )


def card_of(path: str) -> dict | None:
    """The model card of what `load_model(path)` loads: a weights folder's card file, or the
    card a run's latest checkpoint metadata gives; None for a weights folder without one."""
    if _is_weights_folder(path):
        return model_card.read(path)
    return model_card.from_training_meta(_latest_meta(path)[1])


def _summary(path: str) -> str:
    try:
        card = model_card.read(path)
    except model_card.CardError as e:  # the weights are still usable: say so, do not stop
        return f"{e}: training data and licences unknown"
    if card is None:
        return (
            f"{path}: no model card (written before model cards, or copied without "
            f"{model_card.JSON_FILE}): its training data and licences are unknown"
        )
    return card.get("summary") or card_text.summary(card)


def load_model(
    path: str, cache_dir: str = DEFAULT_CACHE, **numerics
) -> tuple[Denoiser, dict[str, Any]]:
    """The denoiser stored at `path` and the facts of the data set it was trained on.

    `path`: an at1-jax weights folder (config.json + params.safetensors, as written by
    `python -m at1_jax.convert` or at the end of training in RUN/weights), local or s3://,
    or a training run / checkpoint folder (the EMA weights of its latest complete step).
    `numerics` override compute settings (dtype, remat…), never the architecture.
    Facts: source, path, step, text_encoder, vae, latent_scale, latent_shift (None = unknown),
    from the checkpoint's record of its data set, or a weights folder's dataset.json
    (the trainer's record) or manifest.json (a data set manifest put next to the weights);
    and summary: the model card's one line (see `card_of`), or why there is none.
    """
    facts: dict[str, Any] = dict.fromkeys(
        ("step", "text_encoder", "vae", "latent_scale", "latent_shift")
    )
    facts.update(source="weights", path=path)
    local, names = path, (weights.CONFIG_FILE, weights.PARAMS_FILE)
    if storage.is_s3(path):
        try:
            local = _fetch(path, names, cache_dir, required=True)
        except MissingFiles:
            model, found = _from_checkpoints(path, numerics)
            return model, {**facts, **found}
        _fetch(path, (MANIFEST_FILE, weights.DATASET_FILE), cache_dir, required=False)
    if not all(os.path.isfile(os.path.join(local, n)) for n in names):
        model, found = _from_checkpoints(path, numerics)
        return model, {**facts, **found}
    model = weights.load(local, **numerics)
    for name in (MANIFEST_FILE, weights.DATASET_FILE):  # the trainer's record wins
        record = os.path.join(local, name)
        if os.path.isfile(record):
            with open(record) as f:
                facts.update(generation_facts(json.load(f), model.cfg.text_dim))
    return model, {**facts, "summary": _summary(path)}
