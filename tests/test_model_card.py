"""Model cards: built from a checkpoint's metadata, secrets removed, JSON and Markdown agree."""

import dataclasses
import json

import numpy as np
import pytest

from at1_jax.checkpointing import card_text, model_card
from at1_jax.checkpointing.load import card_of, load_model
from at1_jax.model import weights
from at1_jax.model.denoiser import Denoiser
from at1_jax.model.presets import PRESETS
from at1_jax.train import config

MODEL = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=32)


def training_meta(**changes) -> dict:
    """Checkpoint metadata as the trainer writes it."""
    cfg = config.TrainConfig(name="cardtest", model=MODEL, steps=40)
    meta = {
        "seed": 0,
        "config": json.loads(config.to_json(cfg)),
        "dataset": {
            "root": "s3://bucket/data",
            "autoencoder": {"kind": "diffusers_autoencoder_kl", "model": "vae-x"},
            "text_encoders": [{"name": "clip", "kind": "clip", "model": "clip-y"}],
            "text_array": "clip_pooled",
            "latent_scale": 0.125,
            "captioning": {"model": "llava-z", "prompt": "Describe the image."},
            "num_samples": 1000,
            "val_num_samples": 50,
            "licenses": {"cc0": 600, "cc-by": 400},
            "sources": {"s3://bucket/images": 1000},
        },
        "parent": None,
        "step": 40,
        "consumed": {
            "samples": 1280,
            "licenses": {"cc-by": 500, "cc0": 780},
            "sources": {"a": 1280},
        },
        "validation": {
            "step": 40,
            "set": {"root": "s3://bucket/data", "split": "val", "samples": 50},
            "bins": ["sigma_0.25", "sigma_0.75"],
            "val_loss": 0.5,
            "val_loss_sigma_0.25": 0.4,
            "val_loss_sigma_0.75": 0.6,
            "val_loss_ema": 0.45,
            "val_loss_ema_sigma_0.25": 0.35,
            "val_loss_ema_sigma_0.75": 0.55,
        },
    }
    meta.update(changes)
    return meta


def test_card_from_training_metadata_field_by_field():
    card = model_card.from_training_meta(training_meta(), created="2026-11-30T00:00:00+00:00")
    assert card["card_version"] == 1 and card["name"] == "cardtest"
    assert card["created"] == "2026-11-30T00:00:00+00:00"
    assert card["model"]["architecture"] == dataclasses.asdict(MODEL)
    # tld-tiny at depth 2 and 8×8 latents is no preset; its count is the model's own.
    assert card["model"]["preset"] is None
    assert card["model"]["parameters"] == model_card.parameter_count(MODEL)
    assert card["origin"] == {"kind": "trained", "run_dir": "runs/run"}
    t = card["training"]
    assert (t["steps"], t["samples_seen"], t["batch_size"], t["seed"]) == (40, 1280, 32, 0)
    assert t["config"]["optim"]["lr"] == 3e-4 and t["config"]["model"]["depth"] == 2
    assert t["samples_counted_from_step"] == 0
    # A run that resumed a checkpoint from before sample counting says what it counted.
    late = model_card.from_training_meta(training_meta(consumed_from_step=20))
    assert "40 steps, 1,280 samples (counted from step 20) from s3://" in late["summary"]
    [d] = card["data"]
    assert d["root"] == "s3://bucket/data"
    assert (d["train_samples"], d["val_samples"]) == (1000, 50)
    assert d["consumed"]["licenses"] == {"cc-by": 500, "cc0": 780}
    assert d["captioning"] == {"model": "llava-z", "prompt": "Describe the image."}
    assert d["autoencoder"]["model"] == "vae-x" and d["text_encoders"][0]["model"] == "clip-y"
    lic = card["licenses"]
    assert lic["consumed"] == {"cc-by": 500, "cc0": 780}
    assert lic["allowed"] == ["cc0", "pdm", "cc-by", "cc-by-sa"]
    assert "cc0 780 (60.9%), cc-by 500 (39.1%)" in lic["statement"]
    assert "cc-by require crediting the authors" in lic["statement"]
    assert card["validation"]["val_loss_ema"] == 0.45 and card["evaluations"] == []
    assert card["parent"] is None
    assert card["software"]["jax"] and card["software"]["python"]
    params = f"{model_card.parameter_count(MODEL):,}"
    assert card["summary"] == (
        f"cardtest: prenorm width 128 depth 2 ({params} parameters); 40 steps, 1,280 samples "
        "from s3://bucket/data; licences cc-by 500, cc0 780; val loss (EMA) 0.4500 at step 40"
    )


def test_no_secret_reaches_a_card(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # not a secret: left alone
    meta = training_meta()
    meta["config"]["name"] = "run-wJalrXUtnFEMI-secret-value"
    meta["config"]["data"]["path"] = "s3://AKIAEXAMPLE:hunter22@bucket/data"
    meta["dataset"]["api_key"] = "abc"
    meta["dataset"]["note"] = "token hf_abcdefghijkl"
    card = model_card.from_training_meta(meta)
    text = json.dumps(card) + card_text.render_markdown(card)
    for secret in ("wJalrXUtnFEMI-secret-value", "hunter22", "AKIAEXAMPLE", "hf_abcdefghijkl"):
        assert secret not in text
    assert card["training"]["config"]["data"]["path"] == "s3://bucket/data"
    assert card["name"] == "run-<redacted>" and card["data"][0].get("api_key") is None
    assert card["training"]["config"]["distributed"]["num_processes"] == 0


def test_write_read_markdown_and_evaluations(tmp_path):
    card = model_card.from_training_meta(training_meta())
    model_card.write(str(tmp_path), card)
    assert model_card.read(str(tmp_path)) == card
    md = (tmp_path / model_card.MARKDOWN_FILE).read_text()
    assert md.startswith("# Model card: cardtest\n\n" + card["summary"])
    for section in ("## Model", "## Licences", "## Training", "## Data", "## Validation"):
        assert section in md
    assert "| captioner prompt | Describe the image. |" in md
    assert "| EMA | 0.45000 | 0.35000 | 0.55000 |" in md
    assert "None yet (`python -m at1_jax.evaluate` adds its results here)." in md
    updated = model_card.add_evaluation(str(tmp_path), "validation_loss", {"val_loss": 0.3})
    assert updated["evaluations"][0]["results"] == {"val_loss": 0.3}
    assert model_card.read(str(tmp_path))["evaluations"] == updated["evaluations"]
    assert 'validation_loss: `{"val_loss": 0.3}`' in (tmp_path / "model_card.md").read_text()
    assert model_card.add_evaluation(str(tmp_path / "none"), "x", {}) is None
    (tmp_path / model_card.JSON_FILE).write_text("{not json")
    with pytest.raises(model_card.CardError, match=r"model_card.json: not a JSON model card"):
        model_card.read(str(tmp_path))


def test_imported_cards_say_what_is_unknown_or_carry_the_exported_card():
    bare = model_card.converted_card(MODEL, "imported", "/w/tld.pth")
    assert bare["origin"] == {"kind": "imported", "from": "/w/tld.pth"}
    assert bare["training"] is None and bare["data"] == [] and bare["parent"] is None
    assert (
        "licences of the training data are not recorded (unknown)"
        in (bare["licenses"]["statement"])
    )
    assert bare["summary"].endswith("imported from /w/tld.pth; training data licences unknown")
    trained = model_card.from_training_meta(training_meta())
    again = model_card.converted_card(MODEL, "imported", "/w/x.safetensors", trained)
    assert again["origin"] == {"kind": "imported", "from": "/w/x.safetensors", "before": {
        "kind": "trained", "run_dir": "runs/run"}}  # fmt: skip
    assert again["training"] == trained["training"] and again["licenses"] == trained["licenses"]


def test_a_fine_tune_names_its_parent_and_inherits_its_licence_statement():
    parent = model_card.from_training_meta(training_meta())
    meta = training_meta(parent=model_card.parent_record("/runs/base/weights", parent))
    meta["consumed"] = {"samples": 8, "licenses": {"unknown": 8}, "sources": {"unknown": 8}}
    card = model_card.from_training_meta(meta)
    assert card["parent"]["path"] == "/runs/base/weights"
    assert card["parent"]["card"]["summary"] == parent["summary"]
    statement = card["licenses"]["statement"]
    assert "unknown 8 (100.0%)" in statement and "their terms are not known" in statement
    inherited = parent["licenses"]["statement"]
    assert f"Fine-tuned from /runs/base/weights: its card says: {inherited}" in statement
    assert card["summary"].endswith("fine-tuned from /runs/base/weights")
    orphan = model_card.parent_record("/w/old", None)
    assert orphan["summary"] == "/w/old: no model card (unknown data)"
    assert "its training data is unknown." in card_text.licence_statement({"cc0": 1}, orphan)


def test_load_model_gives_the_cards_summary(tmp_path):
    from flax import nnx

    arrays = weights.model_arrays(Denoiser(MODEL, nnx.Rngs(0)))
    weights.save(str(tmp_path), MODEL, {k: np.asarray(v) for k, v in arrays.items()})
    _, facts = load_model(str(tmp_path))
    assert card_of(str(tmp_path)) is None
    assert facts["summary"] == (
        f"{tmp_path}: no model card (written before model cards, or copied without "
        "model_card.json): its training data and licences are unknown"
    )
    card = model_card.from_training_meta(training_meta())
    model_card.write(str(tmp_path), card)
    _, facts = load_model(str(tmp_path))
    assert card_of(str(tmp_path)) == card and facts["summary"] == card["summary"]
    (tmp_path / model_card.JSON_FILE).write_text("[]")
    _, facts = load_model(str(tmp_path))  # a broken card does not stop the weights loading
    assert facts["summary"] == (
        f"{tmp_path}/model_card.json: not a model card (no card_version): training data and "
        "licences unknown"
    )
