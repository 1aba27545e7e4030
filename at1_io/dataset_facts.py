"""What a model's training data says about using it: text encoder, VAE, latent scaling."""

from __future__ import annotations

from typing import Any

from at1_io.constants import PIXEL


def generation_facts(record: dict[str, Any], text_dim: int) -> dict[str, Any]:
    """Text encoder (`kind=model`), VAE and decode latent scale recorded for a data set.

    `record` is a data set manifest (data_prep's manifest.json) or the trainer's record of the
    data set it trained on (checkpoint metadata "dataset", a weights folder's dataset.json):
    both carry `autoencoder` and `text_encoders`. The text encoder is the one the trainer
    named (`text_array`) or else the one whose pooled array is `text_dim` wide. The trainer's
    `latent_scale` multiplied raw latents, so decoding multiplies by its inverse. Keys are
    left out where the record does not say.
    """
    facts: dict[str, Any] = {}
    ae = record.get("autoencoder") or {}
    if ae.get("kind") == PIXEL or ae.get("model") == PIXEL:
        facts["vae"] = PIXEL
    elif ae.get("model"):
        facts["vae"] = ae["model"]
    named = str(record.get("text_array") or "").removesuffix("_pooled")
    arrays = record.get("arrays") or {}
    for enc in record.get("text_encoders") or []:
        name = enc.get("name", enc.get("kind"))
        shape = list((arrays.get(f"{name}_pooled") or {}).get("shape", []))
        if (name == named) if named else shape == [text_dim]:
            facts["text_encoder"] = f"{enc['kind']}={enc['model']}"
            break
    if record.get("latent_scale"):
        facts["latent_scale"] = 1.0 / float(record["latent_scale"])
    return facts
