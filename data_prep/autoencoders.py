"""Image autoencoders: a diffusers AutoencoderKL, or the pass-through "pixel" one."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from at1_io.constants import PIXEL
from at1_io.schema import LATENT_MEAN, LATENT_SAMPLE, LATENT_STD, ArraySpec
from data_prep import model_refs


class PixelAutoencoder:
    """Latents are the pixels in [-1, 1], shape (3, R, R); std is zero, scaling 1, shift 0."""

    channels = 3
    downsample = 1
    scaling_factor = 1.0
    shift_factor = 0.0

    def __init__(self, resolution: int):
        self.resolution = resolution

    def info(self) -> dict[str, Any]:
        """Manifest description."""
        return {
            "kind": "pixel",
            "model": PIXEL,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
            "downsample": 1,
            "latent_channels": 3,
        }

    def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,3,R,R) float32 in [-1,1] -> (mean, std) float32."""
        return pixels, np.zeros_like(pixels)


class DiffusersVAE:
    """diffusers AutoencoderKL from a hub id or local path."""

    def __init__(self, model: str, device: str, dtype: torch.dtype, subfolder: str | None = None):
        from diffusers import AutoencoderKL

        self.model_id = model
        self.device, self.dtype = device, dtype
        flag = f"--vae {model}" + (f" --vae-subfolder {subfolder}" if subfolder else "")
        try:
            config = AutoencoderKL.load_config(model, subfolder=subfolder)
        except Exception as e:  # hub and file errors of many types: the reference is unusable
            raise model_refs.load_error(flag, "AutoencoderKL", model, e, model_refs.VAE_HELP) from e
        kind = config.get("_class_name")
        if not kind:
            raise model_refs.ModelError(
                f"{flag}: not a diffusers model folder (its config.json has no _class_name, "
                f"model_type {config.get('model_type')!r}); {model_refs.VAE_HELP}"
            )
        if kind != "AutoencoderKL":
            raise model_refs.ModelError(
                f"{flag}: its config.json describes a {kind}, not an AutoencoderKL; "
                + model_refs.VAE_HELP
            )
        try:
            vae, loading = AutoencoderKL.from_pretrained(
                model, subfolder=subfolder, torch_dtype=dtype, output_loading_info=True
            )
        except Exception as e:
            raise model_refs.load_error(flag, "AutoencoderKL", model, e, model_refs.VAE_HELP) from e
        model_refs.check_weights(
            flag,
            "AutoencoderKL",
            kind,
            loading["missing_keys"],
            len(vae.state_dict()),
            model_refs.VAE_HELP,
        )
        self.vae = vae.to(device).eval()
        cfg = self.vae.config
        self.channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def info(self) -> dict[str, Any]:
        """Manifest description, with the VAE's own scaling/shift factors."""
        return {
            "kind": "diffusers_autoencoder_kl",
            "model": self.model_id,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "downsample": self.downsample,
            "latent_channels": self.channels,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,3,R,R) float32 in [-1,1] -> posterior (mean, std) float32, unscaled."""
        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


def load_autoencoder(
    model: str, resolution: int, device: str, dtype: torch.dtype, subfolder: str | None = None
) -> PixelAutoencoder | DiffusersVAE:
    """``pixel`` or any diffusers AutoencoderKL id/path."""
    if model == PIXEL:
        return PixelAutoencoder(resolution)
    return DiffusersVAE(model, device, dtype, subfolder)


def latent_arrays(
    ae: PixelAutoencoder | DiffusersVAE, resolution: int, latent: str
) -> dict[str, ArraySpec]:
    """Array specs the autoencoder stage writes: mean+std (default) or one sample."""
    side = resolution // ae.downsample
    shape = (ae.channels, side, side)
    if latent == "sample":
        return {LATENT_SAMPLE: ArraySpec(LATENT_SAMPLE, shape, "float16", "posterior sample")}
    return {
        LATENT_MEAN: ArraySpec(LATENT_MEAN, shape, "float16", "posterior mean, unscaled"),
        LATENT_STD: ArraySpec(LATENT_STD, shape, "float16", "posterior std"),
    }


def latent_outputs(
    mean: np.ndarray, std: np.ndarray, latent: str, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Batched arrays to store: fp16 mean/std, or a fp16 sample mean + std * noise."""
    if latent == "sample":
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        return {LATENT_SAMPLE: (mean + std * noise).astype(np.float16)}
    return {LATENT_MEAN: mean.astype(np.float16), LATENT_STD: std.astype(np.float16)}
