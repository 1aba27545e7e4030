"""The loaded model bundle of a run: autoencoder, text encoders, optional captioner."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from at1_io.schema import ArraySpec
from data_prep.autoencoders import latent_arrays, load_autoencoder
from data_prep.caption import Captioner, CaptionSettings
from data_prep.settings import EncodeSettings, parse_spec
from data_prep.text_encoders import TextEncoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]


class Models:
    """Everything with weights that a run needs, loaded once."""

    def __init__(self, s: EncodeSettings):
        self.device = pick_device(s.device)
        self.dtype = pick_dtype(s.dtype, self.device)
        self.latent = s.latent
        self.ae = load_autoencoder(s.vae, s.resolution, self.device, self.dtype, s.vae_subfolder)
        self.text = [
            TextEncoder(parse_spec(v), self.device, self.dtype, s.clip_tokens, s.text_max_length)
            for v in s.text_encoders
        ]
        self.captioner = None
        if s.caption != "off":
            cs = CaptionSettings(
                s.captioner,
                s.caption_prompt,
                s.caption_temperature,
                s.caption_max_new_tokens,
                s.caption,
            )
            self.captioner = Captioner(cs, self.device, self.dtype)
        self.arrays: dict[str, ArraySpec] = latent_arrays(self.ae, s.resolution, s.latent)
        for enc in self.text:
            self.arrays.update(enc.arrays())

    def text_arrays(self) -> dict[str, ArraySpec]:
        """Specs of the text arrays only (what validation prompts carry)."""
        out = {}
        for enc in self.text:
            out.update(enc.arrays())
        return out

    def encode_text(self, texts: list[str]) -> dict[str, np.ndarray]:
        """All text encoders on one batch of strings."""
        out = {}
        for enc in self.text:
            out.update(enc.encode(texts))
        return out

    def info(self) -> dict[str, Any]:
        """Manifest sections for the models."""
        return {
            "autoencoder": self.ae.info(),
            "text_encoders": [t.info() for t in self.text],
            "captioning": self.captioner.info() if self.captioner else None,
        }
