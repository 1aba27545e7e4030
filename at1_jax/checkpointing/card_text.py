"""A model card in words: its one-line summary, its licence statement and its Markdown page."""

from __future__ import annotations

import json
from typing import Any

from at1_io.constants import UNKNOWN_LICENSE

# Licences that oblige users of the images to credit their authors.
_ATTRIBUTION = ("cc-by", "cc-by-sa")


def _share(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(
        f"{k} {v:,} ({100 * v / total:.1f}%)"
        for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def licence_statement(consumed: dict[str, int] | None, parent: dict | None) -> str:
    """Which licences the training data carried, in words (the parent's data included)."""
    if consumed:
        text = (
            f"The images these weights were trained on carried these licences (samples "
            f"consumed by training, resumes counted once): {_share(consumed)}."
        )
        if UNKNOWN_LICENSE in consumed:
            text += (
                f" '{UNKNOWN_LICENSE}': samples without a licence record in their data set; "
                "their terms are not known."
            )
        credit = [k for k in _ATTRIBUTION if k in consumed]
        if credit:
            text += (
                f" {', '.join(credit)} require crediting the authors: each sample's source and "
                "licence are in its data set's shards (json)."
            )
    else:
        text = (
            "The licences of the training data are not recorded (unknown): these weights "
            "came from outside this project's trainer or from a run that predates licence "
            "counting."
        )
    if parent:
        inherited = (parent.get("card") or {}).get("licenses", {}).get("statement")
        text += f" Fine-tuned from {parent.get('path')}: " + (
            f"its card says: {inherited}" if inherited else "its training data is unknown."
        )
    return text


def _architecture(model: dict) -> str:
    a = model.get("architecture") or {}
    shape = f"{a.get('block')} width {a.get('width')} depth {a.get('depth')}"
    preset = f"{model['preset']}, " if model.get("preset") else ""
    return f"{preset}{shape} ({model.get('parameters', 0):,} parameters)"


def summary(card: dict) -> str:
    """One line: what the weights are, how much data under which licences, the last loss."""
    parts = [f"{card.get('name')}: {_architecture(card.get('model') or {})}"]
    origin = card.get("origin") or {}
    training = card.get("training")
    if training:
        roots = ", ".join(str(d.get("root")) for d in card.get("data") or [])
        samples = training.get("samples_seen")
        seen = f"{samples:,} samples" if isinstance(samples, int) else "samples not counted"
        if training.get("samples_counted_from_step"):
            seen += f" (counted from step {training['samples_counted_from_step']})"
        parts.append(f"{training.get('steps')} steps, {seen} from {roots}")
    if origin.get("kind") in ("imported", "exported"):
        parts.append(f"{origin['kind']} from {origin.get('from')}")
    consumed = (card.get("licenses") or {}).get("consumed")
    parts.append(
        "licences " + ", ".join(f"{k} {v:,}" for k, v in sorted(consumed.items()))
        if consumed
        else "training data licences unknown"
    )
    val = card.get("validation")
    if val:
        parts.append(f"val loss (EMA) {val['val_loss_ema']:.4f} at step {val['step']}")
    if card.get("parent"):
        parts.append(f"fine-tuned from {card['parent'].get('path')}")
    return "; ".join(parts)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in rows if v not in (None, "", [], {})]


def _counts(counts: dict | None) -> str:
    return _share(counts) if counts else "unknown"


def render_markdown(card: dict) -> str:
    """The card for people: the same facts as the JSON."""
    model, training = card.get("model") or {}, card.get("training")
    lines = [f"# Model card: {card.get('name')}", "", card.get("summary", ""), "", "## Model", ""]
    lines += _table(
        [
            ("architecture", _architecture(model)),
            ("config", f"`{json.dumps(model.get('architecture'), sort_keys=True)}`"),
            ("origin", f"`{json.dumps(card.get('origin'), sort_keys=True)}`"),
            ("created", card.get("created")),
            ("software", ", ".join(f"{k} {v}" for k, v in (card.get("software") or {}).items())),
        ]
    )
    lines += ["", "## Licences", "", card["licenses"]["statement"], ""]
    if card["licenses"].get("allowed"):
        lines += [f"Allowed by the training config: {', '.join(card['licenses']['allowed'])}.", ""]
    lines += ["## Training", ""]
    if training:
        lines += _table(
            [
                ("steps", training.get("steps")),
                ("samples seen", training.get("samples_seen")),
                ("samples counted from step", training.get("samples_counted_from_step") or None),
                ("batch size", training.get("batch_size")),
                ("seed", training.get("seed")),
            ]
        )
        config = json.dumps(training.get("config"), indent=2, sort_keys=True)
        lines += ["", "Training config (secrets removed):", "", "```json", config, "```"]
    else:
        lines += ["Not recorded: these weights were not trained by this project's trainer."]
    lines += ["", "## Data", ""]
    for d in card.get("data") or []:
        captioning = d.get("captioning") or {}
        lines += [f"### {d.get('root')}", ""]
        lines += _table(
            [
                ("training split samples", d.get("train_samples")),
                ("validation split samples", d.get("val_samples")),
                ("samples consumed", (d.get("consumed") or {}).get("samples")),
                ("licences consumed", _counts((d.get("consumed") or {}).get("licenses"))),
                ("sources consumed", _counts((d.get("consumed") or {}).get("sources"))),
                ("licences of the training split", _counts(d.get("licenses"))),
                ("captioner", captioning.get("model") or "none (captions as given)"),
                ("captioner prompt", captioning.get("prompt")),
                ("autoencoder", f"`{json.dumps(d.get('autoencoder'), sort_keys=True)}`"),
                ("text encoders", f"`{json.dumps(d.get('text_encoders'), sort_keys=True)}`"),
                ("text array", d.get("text_array")),
                ("latent scale", d.get("latent_scale")),
            ]
        )
        lines.append("")
    if not card.get("data"):
        lines += ["Not recorded (unknown).", ""]
    lines += ["## Validation", ""]
    val = card.get("validation")
    if val:
        lines += [
            f"x0-loss at step {val['step']} on {json.dumps(val.get('set'))}, noise levels "
            f"{', '.join(val.get('bins') or [])} (fixed noise seeds):",
            "",
            "| weights | mean | " + " | ".join(val.get("bins") or []) + " |",
            "|---|---|" + "---|" * len(val.get("bins") or []),
        ]
        for label, key in (("EMA", "val_loss_ema"), ("live", "val_loss")):
            cells = [f"{val.get(f'{key}_{b}', float('nan')):.5f}" for b in val.get("bins") or []]
            lines.append(f"| {label} | {val[key]:.5f} | " + " | ".join(cells) + " |")
    else:
        lines.append("No validation loss recorded.")
    lines += ["", "## Evaluations", ""]
    for e in card.get("evaluations") or []:
        lines.append(f"- {e.get('date')} {e.get('kind')}: `{json.dumps(e.get('results'))}`")
    if not card.get("evaluations"):
        lines.append("None yet (`python -m at1_jax.evaluate` adds its results here).")
    parent = card.get("parent")
    lines += ["", "## Parent", "", parent["summary"] if parent else "None: trained from scratch."]
    return "\n".join(lines) + "\n"
