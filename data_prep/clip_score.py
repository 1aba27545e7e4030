"""CLIP image and text embeddings for the CLIP score (PyTorch side; the formula is in JAX's).

Preprocessing follows torchmetrics' CLIPScore: the model's own image processor (resize,
center crop, normalise) and tokenizer (truncated to the text model's position limit).
Embeddings are the projected, unnormalised features; at1_jax.evaluate.metrics normalises them.
"""

from __future__ import annotations

import numpy as np
import torch


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor.
    return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipEmbedder:
    """A transformers CLIPModel with its tokenizer and image processor, from an id or folder."""

    def __init__(self, model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device, self.dtype = device, dtype
        self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.image_processor = AutoImageProcessor.from_pretrained(model)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def image_embeds(self, images_NHWC: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """f32[N, P] projected image features of uint8 RGB images."""
        out = []
        for i in range(0, len(images_NHWC), batch_size):
            batch = list(images_NHWC[i : i + batch_size])
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            out.append(_pooled(feats).float().cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def text_embeds(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """f32[N, P] projected text features."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
            )
            out.append(_pooled(feats).float().cpu().numpy())
        return np.concatenate(out)
