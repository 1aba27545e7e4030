"""PyTorch-side helpers of `python -m at1_jax.sample`: prompt encoding and VAE decoding.

at1_jax never imports torch; its torch_bridge imports this module lazily, only when a prompt
is not in the embedding cache or `--decode torch` is asked for (the default decoder is JAX's).
"""

from __future__ import annotations

import numpy as np
import torch


def prompt_encoder(kind: str, model: str):
    """data_prep's TextEncoder for one pooled encoder, fp32 on CPU: texts → {kind}_pooled."""
    from data_prep.settings import TextEncoderSpec
    from data_prep.text_encoders import TextEncoder

    return TextEncoder(TextEncoderSpec(kind, kind, model), "cpu", torch.float32)


class TorchDecoder:
    """A diffusers AutoencoderKL loaded once (fp32 unless told otherwise); latents unscaled."""

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
