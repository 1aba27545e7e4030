"""Model cards: what a set of weights is and what it was trained on, beside the weights.

Every weights folder the project writes (end of training, `convert import`) holds
`model_card.json` (for tools) and `model_card.md` (for people, rendered from the JSON by
`card_text`): architecture and parameter count, the training config (secrets removed), steps
and samples seen, the data sets (roots, sample counts, licences of what was consumed, captioner and
prompt, autoencoder, text encoders), the last validation loss, evaluation results (added by
`python -m at1_jax.evaluate`), the parent weights of a fine-tune (with their card), the date
and software versions, and a licence statement. A checkpoint's metadata holds the same facts:
`from_training_meta` builds the card of a run's latest step the same way as its export.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import tempfile
from typing import Any

from flax import nnx

from at1_io import storage
from at1_jax.checkpointing.card_text import licence_statement, render_markdown, summary
from at1_jax.model.denoiser import Denoiser, DenoiserConfig, count_params
from at1_jax.model.torch_names import preset_name
from at1_jax.model.weights import config_from_dict

CARD_VERSION = 1
JSON_FILE = "model_card.json"
MARKDOWN_FILE = "model_card.md"
SOFTWARE = ("at1-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
REDACTED = "<redacted>"
# Words that mark a config key or environment variable as a secret (AWS_SECRET_ACCESS_KEY,
# WANDB_API_KEY, HF_TOKEN): such values never reach a card.
_SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "credentials"})
_URL_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


class CardError(ValueError):
    """A model card that cannot be read; the message names the file."""


def parameter_count(cfg: DenoiserConfig) -> int:
    """Trainable scalars of a model of this config (computed from shapes, nothing allocated)."""
    return count_params(nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0))))


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages that produced the weights."""
    found = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _secret_name(name: str) -> bool:
    return bool(_SECRET_WORDS & set(re.split(r"[^a-z]+", name.lower())))


def _secret_values() -> list[str]:
    """Values of environment variables whose names say they hold secrets (keys, tokens)."""
    # Short values ("1", "true") are settings, not secrets, and would mangle the card.
    return [v for k, v in os.environ.items() if _secret_name(k) and len(v) >= 8]


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` without secrets: secret-named keys, URL user:password parts, env secret values."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: REDACTED if _secret_name(str(k)) else scrub(v, secrets) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str):
        value = _URL_USERINFO.sub(r"\1", value)
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def _model_section(cfg: DenoiserConfig) -> dict:
    return {
        "architecture": dataclasses.asdict(cfg),
        "preset": preset_name(cfg),
        "parameters": parameter_count(cfg),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def from_training_meta(meta: dict, created: str | None = None) -> dict:
    """The card of the weights a checkpoint holds, from its metadata (config, data, counts)."""
    config = meta.get("config") or {}
    cfg = config_from_dict(config.get("model"), "checkpoint metadata config.model")
    dataset = meta.get("dataset") or {}
    consumed = meta.get("consumed") or {}
    parent = meta.get("parent")
    allowed = [s for s in str((config.get("data") or {}).get("licenses", "")).split(",") if s]
    data_record = {
        "root": dataset.get("root"),
        "train_samples": dataset.get("num_samples"),
        "val_samples": dataset.get("val_num_samples"),
        "licenses": dataset.get("licenses"),  # of the whole training split
        "sources": dataset.get("sources"),
        "consumed": consumed or None,  # what training took from it
        "captioning": dataset.get("captioning"),
        "autoencoder": dataset.get("autoencoder"),
        "text_encoders": dataset.get("text_encoders"),
        "text_array": dataset.get("text_array"),
        "latent_scale": dataset.get("latent_scale"),
    }
    card = {
        "card_version": CARD_VERSION,
        "name": config.get("name"),
        "created": created or _now(),
        "software": software_versions(),
        "origin": {"kind": "trained", "run_dir": config.get("run_dir")},
        "model": _model_section(cfg),
        "training": {
            "steps": meta.get("step"),
            "samples_seen": consumed.get("samples"),
            # > 0 when the run resumed a checkpoint written before samples were counted.
            "samples_counted_from_step": meta.get("consumed_from_step", 0),
            "batch_size": (config.get("data") or {}).get("batch_size"),
            "seed": config.get("seed"),
            "config": config,
        },
        "data": [data_record],
        "licenses": {
            "consumed": consumed.get("licenses"),
            "allowed": allowed,
            "statement": licence_statement(consumed.get("licenses"), parent),
        },
        "validation": meta.get("validation"),
        "evaluations": [],
        "parent": parent,
    }
    return finish(card)


def converted_card(
    cfg: DenoiserConfig, kind: str, source: str, carried: dict | None = None
) -> dict:
    """The card of weights imported or exported from `source`: the card they carried, else unknown.

    `kind`: "imported" (a PyTorch file into a weights folder) or "exported" (the reverse).
    """
    if carried:
        card = dict(carried)
        card["origin"] = {"kind": kind, "from": source, "before": carried.get("origin")}
        card["model"] = _model_section(cfg)
        card["software"] = software_versions()
        return finish(card)
    card = {
        "card_version": CARD_VERSION,
        "name": os.path.basename(source.rstrip("/")),
        "created": _now(),
        "software": software_versions(),
        "origin": {"kind": kind, "from": source},
        "model": _model_section(cfg),
        "training": None,
        "data": [],
        "licenses": {"consumed": None, "allowed": None, "statement": licence_statement(None, None)},
        "validation": None,
        "evaluations": [],
        "parent": None,
    }
    return finish(card)


def parent_record(path: str, card: dict | None) -> dict:
    """What a fine-tune records of the weights it started from."""
    return {
        "path": path,
        "summary": card.get("summary") if card else f"{path}: no model card (unknown data)",
        "card": card,
    }


def finish(card: dict) -> dict:
    """The card with its summary line set and every secret removed."""
    card = scrub(card)
    card["summary"] = summary(card)
    return card


def write(directory: str, card: dict, prefix: str = "") -> None:
    """Writes model_card.json and model_card.md into a weights folder (local or s3://).

    `prefix` names a card that sits beside a weights file (`tld.` → tld.model_card.json).
    """
    card = finish(card)
    files = {
        prefix + JSON_FILE: json.dumps(card, indent=2, sort_keys=True) + "\n",
        prefix + MARKDOWN_FILE: render_markdown(card),
    }
    for name, text in files.items():
        url = storage.join(directory, name)
        if storage.is_s3(directory):
            storage.put_bytes(text.encode(), url, tempfile.gettempdir())
            continue
        tmp = f"{url}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, url)


def read(directory: str) -> dict | None:
    """The card of a weights folder (local or s3://); None if it has none."""
    url = storage.join(directory, JSON_FILE)
    if not storage.exists(url):
        return None
    try:
        card = json.loads(storage.read_bytes(url))
    except (ValueError, UnicodeDecodeError) as e:
        raise CardError(f"{url}: not a JSON model card ({e}); delete it or re-export") from e
    if not isinstance(card, dict) or not isinstance(card.get("card_version"), int):
        raise CardError(f"{url}: not a model card (no card_version)")
    return card


def add_evaluation(directory: str, kind: str, results: dict) -> dict | None:
    """Appends an evaluation to a weights folder's card; None if the folder has no card."""
    card = read(directory)
    if card is None:
        return None
    entry = {"date": _now(), "kind": kind, "results": results}
    card["evaluations"] = [*(card.get("evaluations") or []), entry]
    write(directory, card)
    return card
