"""Image captioning with any Hugging Face image-text-to-text model (default LLaVA-1.5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image

from data_prep.settings import DEFAULT_CAPTIONER, DEFAULT_PROMPT


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


class Captioner:
    """Batched captioning: left padding, only the generated tokens are decoded."""

    def __init__(self, settings: CaptionSettings, device: str, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.settings, self.device = settings, device
        self.processor = AutoProcessor.from_pretrained(settings.model)
        # Batched generation appends after the prompt: prompts must be aligned on the right.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(settings.model, dtype=dtype)
        self.model.to(device).eval()
        self.dtype = dtype
        self.text = self._prompt_text()

    def _prompt_text(self) -> str:
        prompt = self.settings.prompt
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            ]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return f"USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's own format

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
