"""Captioning through LLaVA-1.5's real processor settings: prompt in, new tokens out."""

import pytest
import torch
from fixtures_images import write_image_folder
from fixtures_llava import (
    IMAGE_TOKEN,
    NUM_IMAGE_TOKENS,
    build_llava15,
    llava_15_prompt,
)
from PIL import Image
from test_data_pipeline import read_dataset, settings

from data_prep import pipeline
from data_prep.caption import Captioner, CaptionerError, CaptionSettings, clean
from data_prep.settings import DEFAULT_PROMPT


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    return build_llava15(tmp_path_factory.mktemp("llava15"))


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (50, 60), (0, 0, 255))]


def test_model_receives_the_llava15_prompt_and_returns_new_tokens_only(llava15, images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cap = Captioner(CaptionSettings(llava15, temperature=0.0, max_new_tokens=5), "cpu",
                    torch.float32)  # fmt: skip
    assert cap.text == llava_15_prompt(DEFAULT_PROMPT)
    assert cap.processor.tokenizer.padding_side == "left"
    seen = {}
    generate = cap.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        seen["out"] = generate(**kwargs)
        return seen["out"]

    cap.model.generate = spy
    got = cap.caption(images, seed=0)

    # What the model receives: <image> expanded to the 576 tokens of CLIP ViT-L/14-336, the
    # prompt's text tokens around them, and 336x336 pixels per image.
    tok = cap.processor.tokenizer
    expanded = llava_15_prompt(DEFAULT_PROMPT).replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS)
    want_ids = tok(expanded)["input_ids"]
    assert seen["input_ids"].tolist() == [want_ids] * 2
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (seen["input_ids"] == image_id).sum(1).tolist() == [NUM_IMAGE_TOKENS] * 2
    assert tuple(seen["pixel_values"].shape) == (2, 3, 336, 336)

    # What comes back: the decoded new tokens, never the prompt.
    new = seen["out"][:, len(want_ids) :]
    assert new.shape[1] == 5
    assert got == [clean(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    proc = AutoProcessor.from_pretrained(llava15)
    model = AutoModelForImageTextToText.from_pretrained(llava15).eval()
    for img, text in zip(images, got, strict=True):  # one at a time, without the Captioner
        inputs = proc(images=[img], text=[llava_15_prompt(DEFAULT_PROMPT)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=5)
        assert text == clean(proc.decode(out[0, len(want_ids) :], skip_special_tokens=True))


def test_sampling_is_seeded(llava15, images):
    cap = Captioner(CaptionSettings(llava15, max_new_tokens=8), "cpu", torch.float32)
    a, b, c = cap.caption(images, 1), cap.caption(images, 1), cap.caption(images, 2)
    assert a == b and a != c
    assert cap.info()["temperature"] == 0.2 and cap.info()["prompt"].startswith("describe")


def test_missing_or_wrong_chat_template_is_an_error(tiny_models, tmp_path):
    def load(path):
        return Captioner(CaptionSettings(str(path)), "cpu", torch.float32)

    with pytest.raises(CaptionerError, match=r"--captioner .*llava: its processor has no chat"):
        load(tiny_models.llava)  # a processor saved without chat_template
    text_only = "{% for m in messages %}{{ m['content'][1]['text'] }}{% endfor %}"
    with pytest.raises(CaptionerError, match=r"renders 0 <image> tokens for 1 image"):
        load(build_llava15(tmp_path / "text_only", chat_template=text_only))
    no_prompt = "USER: <image>\n ASSISTANT:"
    with pytest.raises(CaptionerError, match=r"drops the prompt"):
        load(build_llava15(tmp_path / "no_prompt", chat_template=no_prompt))


def test_clean_whitespace():
    assert clean("  a\n\tred   dog \n") == "a red dog"


@pytest.mark.parametrize("mode", ["missing", "all", "both"])
def test_caption_modes(llava15, tmp_path, tiny_models, mode):
    write_image_folder(tmp_path / "in", 3)
    (tmp_path / "in" / "img001.txt").unlink()  # one image without a caption
    s = settings(tiny_models, tmp_path / "in", tmp_path / "out", caption=mode,
                 captioner=llava15, caption_max_new_tokens=4, shard_size=10)  # fmt: skip
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
