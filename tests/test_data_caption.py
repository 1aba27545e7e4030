"""Captioning with a tiny random LLaVA: new tokens only, seeded sampling, the three modes."""

import pytest
import torch
from fixtures_images import write_image_folder
from PIL import Image
from test_data_pipeline import read_dataset, settings

from data_prep import pipeline
from data_prep.caption import Captioner, CaptionSettings, clean


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (50, 60), (0, 0, 255))]


def test_only_new_tokens_decoded_against_manual_generate(tiny_models, images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cap = Captioner(CaptionSettings(tiny_models.llava, temperature=0.0, max_new_tokens=5), "cpu",
                    torch.float32)  # fmt: skip
    assert cap.processor.tokenizer.padding_side == "left"
    assert cap.text == "USER: <image>\ndescribe this image in a highly detailed manner ASSISTANT:"
    got = cap.caption(images, seed=0)

    proc = AutoProcessor.from_pretrained(tiny_models.llava)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models.llava).eval()
    for img, text in zip(images, got, strict=True):
        inputs = proc(images=[img], text=[cap.text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=5)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert len(new) == 5
        assert text == " ".join(proc.decode(new, skip_special_tokens=True).split())


def test_sampling_is_seeded(tiny_models, images):
    cap = Captioner(CaptionSettings(tiny_models.llava, max_new_tokens=8), "cpu", torch.float32)
    a, b, c = cap.caption(images, 1), cap.caption(images, 1), cap.caption(images, 2)
    assert a == b and a != c
    assert cap.info()["temperature"] == 0.2 and cap.info()["prompt"].startswith("describe")


def test_clean_whitespace():
    assert clean("  a\n\tred   dog \n") == "a red dog"


@pytest.mark.parametrize("mode", ["missing", "all", "both"])
def test_caption_modes(tiny_models, tmp_path, mode):
    write_image_folder(tmp_path / "in", 3)
    (tmp_path / "in" / "img001.txt").unlink()  # one image without a caption
    s = settings(tiny_models, tmp_path / "in", tmp_path / "out", caption=mode,
                 captioner=tiny_models.llava, caption_max_new_tokens=4, shard_size=10)  # fmt: skip
    pipeline.run(s)
    m, samples = read_dataset(tmp_path / "out")
    assert m.captioning["mode"] == mode and m.captioning["max_new_tokens"] == 4
    origins = [smp["json"]["caption_origin"] for smp in samples]
    if mode == "missing":
        assert origins == ["original", "generated", "original"]
        assert samples[0]["caption"] == "a red square with a tree 0"
    else:
        assert origins == ["generated"] * 3
    assert all(len(smp["caption"].split()) >= 1 for smp in samples)
    has_original = ["original_caption" in smp for smp in samples]
    assert has_original == ([True, False, True] if mode == "both" else [False] * 3)
    if mode == "both":
        assert samples[2]["original_caption"] == "a red square with a tree 2"
