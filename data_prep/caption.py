"""Image captioning with any Hugging Face image-text-to-text model (default LLaVA-1.5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image

from data_prep import model_refs
from data_prep.settings import DEFAULT_CAPTIONER, DEFAULT_PROMPT

HELP = (
    "--captioner takes an image-text-to-text model whose processor has a chat template "
    "that places one image and the prompt (llava-hf/llava-1.5-7b-hf's does)"
)


@dataclasses.dataclass(frozen=True)
class CaptionSettings:
    """Captioner model, prompt and sampling settings."""

    model: str = DEFAULT_CAPTIONER
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.2
    max_new_tokens: int = 128
    mode: str = "missing"


def clean(text: str) -> str:
    """Collapse whitespace runs to single spaces and strip."""
    return " ".join(text.split())


class CaptionerError(ValueError):
    """A captioner whose processor cannot build its prompt; raised before any work starts."""


class Captioner:
    """Batched captioning: left padding, only the generated tokens are decoded."""

    def __init__(self, settings: CaptionSettings, device: str, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.settings, self.device = settings, device
        self.flag = f"--captioner {settings.model}"
        cls = AutoModelForImageTextToText
        try:
            self.processor = AutoProcessor.from_pretrained(settings.model)
            self.text = self._prompt_text()  # before the weights load: a bad template fails fast
            model, loading = cls.from_pretrained(
                settings.model, dtype=dtype, output_loading_info=True
            )
        except CaptionerError:
            raise
        except Exception as e:  # loaders raise many types; each means this model is unusable
            raise model_refs.load_error(self.flag, cls.__name__, settings.model, e, HELP) from e
        model_refs.check_weights(
            self.flag,
            type(model).__name__,
            model.config.model_type,
            loading["missing_keys"],
            len(model.state_dict()),
            HELP,
        )
        # Batched generation appends after the prompt: prompts must be aligned on the right.
        self.processor.tokenizer.padding_side = "left"
        self.model = model.to(device).eval()
        self.dtype = dtype

    def _prompt_text(self) -> str:
        """The prompt through the processor's chat template, checked to hold image and text."""
        if not getattr(self.processor, "chat_template", None):
            raise CaptionerError(
                f"{self.flag}: its processor has no chat template, so the prompt format the "
                f"model was trained on is unknown; {HELP}"
            )
        prompt = self.settings.prompt
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", None)
        if image_token and text.count(image_token) != 1:
            raise CaptionerError(
                f"{self.flag}: the chat template renders {text.count(image_token)} "
                f"{image_token} tokens for 1 image ({text!r}); {HELP}"
            )
        if prompt not in text:
            raise CaptionerError(
                f"{self.flag}: the chat template drops the prompt {prompt!r} ({text!r}); {HELP}"
            )
        return text

    def info(self) -> dict[str, Any]:
        """Manifest description."""
        s = self.settings
        return {
            "model": s.model,
            "prompt": s.prompt,
            "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens,
            "mode": s.mode,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], seed: int) -> list[str]:
        """Captions for a batch of RGB images; sampling is seeded for reproducible reruns."""
        inputs = self.processor(
            images=images, text=[self.text] * len(images), return_tensors="pt", padding=True
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        sample = self.settings.temperature > 0
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            out = self.model.generate(
                **inputs,
                do_sample=sample,
                temperature=self.settings.temperature if sample else None,
                top_p=None,
                top_k=None,
                max_new_tokens=self.settings.max_new_tokens,
            )
        finally:
            torch.random.set_rng_state(generator_state)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [clean(t) for t in texts]
