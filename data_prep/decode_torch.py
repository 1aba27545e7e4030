"""Decode raw VAE latents to uint8 images with diffusers' AutoencoderKL in PyTorch.

The fallback for `python -m at1_jax.sample --decode torch`; the default path is the Flax
decoder in at1_jax.vae. Latents arrive unscaled (what `AutoencoderKL.decode` takes).
"""

from __future__ import annotations

import numpy as np
import torch


class TorchDecoder:
    """A diffusers AutoencoderKL loaded once (fp32 unless told otherwise)."""

    def __init__(self, model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL

        self.device, self.dtype = device, dtype
        self.vae = AutoencoderKL.from_pretrained(model, torch_dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def decode(self, latents_NCHW: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Raw latents (N, C, h, w) → uint8 NHWC, rounded as diffusers' numpy_to_pil does."""
        out = []
        for i in range(0, len(latents_NCHW), batch_size):
            z = torch.from_numpy(np.ascontiguousarray(latents_NCHW[i : i + batch_size]))
            x = self.vae.decode(z.to(self.device, self.dtype)).sample.float()
            x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            out.append(np.round(x * 255.0).astype(np.uint8))
        return np.concatenate(out)
