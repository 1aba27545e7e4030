"""Synthetic shapes and the analytic prompt-adherence score."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from at1_demo import adherence
from at1_demo import synthetic_shapes as shapes


def test_every_drawn_combination_is_read_back():
    # Every combination, drawn without jitter: the scorer must recover all five attributes.
    combos = shapes.all_attributes()
    imgs = [np.asarray(shapes.draw(a, 32)) for a in combos]
    result = adherence.score(imgs, combos)
    assert result["all"] == 1.0, result


def test_jittered_training_images_score_near_perfect_and_noise_near_chance():
    rng = np.random.default_rng(0)
    combos = [shapes.all_attributes()[i] for i in rng.integers(0, 850, 300)]
    imgs = [np.asarray(shapes.draw(a, 32, rng)) for a in combos]
    assert adherence.score(imgs, combos)["mean"] > 0.98
    noise = adherence.score([rng.random((32, 32, 3)) for _ in combos], combos)
    # 300 guesses per attribute: chance ± 3 binomial standard deviations (≤ 0.09).
    for field, p in adherence.chance().items():
        assert abs(noise[field] - p) < 3 * np.sqrt(p * (1 - p) / 300) + 0.02, field


def test_blank_image_has_no_shape():
    got = adherence.analyse(np.full((32, 32, 3), 0.5))
    assert got["colour"] is None and got["shape"] is None


def test_chance_levels():
    c = adherence.chance()
    assert c["background"] == pytest.approx(1 / 6) and c["colour"] == pytest.approx(1 / 5)
    assert (c["shape"], c["position"], c["size"]) == (pytest.approx(1 / 3), 0.2, 0.5)


def test_generate_holds_out_combinations_and_writes_sidecars(tmp_path):
    counts = shapes.generate(str(tmp_path), num=60, size=24, held_out=10, seed=3, validation=7)
    assert counts == {"images": 60, "train_combinations": 883, "held_out": 10, "validation": 7}
    held = [json.loads(x) for x in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    held_captions, val_captions = {h["caption"] for h in held}, {v["caption"] for v in val}
    assert (tmp_path / "held_out.txt").read_text().splitlines() == [h["caption"] for h in held]
    assert (tmp_path / "validation.txt").read_text().splitlines() == [v["caption"] for v in val]
    assert len(held_captions) == 10 and len(val_captions) == 7
    assert not held_captions & val_captions
    # The three sets partition every combination; the held-out set does not depend on how
    # many validation prompts are drawn.
    train, held2, val2 = shapes.split(10, 3, 7)
    assert len(train) + 10 + 7 == len(shapes.all_attributes())
    without_val = shapes.split(10, 3)[1]
    assert {a.caption for a in held2} == held_captions == {a.caption for a in without_val}
    assert {a.caption for a in val2} == val_captions
    assert not {a.caption for a in train} & (held_captions | val_captions)
    with pytest.raises(ValueError, match="held_out \\+ validation = 900 leaves no training"):
        shapes.split(850, 0, 50)
    for i in range(60):
        meta = json.loads((tmp_path / "images" / f"shape{i:06d}.json").read_text())
        caption = (tmp_path / "images" / f"shape{i:06d}.txt").read_text()
        attrs = shapes.Attributes(
            **{f.name: meta[f.name] for f in dataclasses.fields(shapes.Attributes)}
        )
        assert caption == attrs.caption and caption not in held_captions | val_captions
        assert meta["license"] == "cc0"
        assert Image.open(tmp_path / "images" / f"shape{i:06d}.png").size == (24, 24)
    again = tmp_path / "again"
    shapes.generate(str(again), num=60, size=24, held_out=10, seed=3, validation=7)
    assert (again / "held_out.txt").read_text() == (tmp_path / "held_out.txt").read_text()
