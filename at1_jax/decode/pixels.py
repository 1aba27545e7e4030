"""Model latents → uint8 pixels, the one path that sample, evaluate and training grids use."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from at1_io.constants import DEFAULT_VAE, PIXEL, REFERENCE_LATENT_SCALE
from at1_jax.decode import images

DECODERS = ("jax", "torch", "none")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How model latents become pixels: raw VAE latent = x0 · latent_scale + latent_shift."""

    mode: str  # jax | torch | none | pixel
    vae: str  # hub id, folder, or "pixel"
    latent_scale: float
    latent_shift: float


def resolve_decode(
    facts: dict[str, Any], channels: int, decode: str, vae: str | None, scale: float | None
) -> DecodeSpec:
    """The data set's VAE and latent scaling (`facts`) unless overridden on the command line."""
    if decode not in DECODERS:
        raise ValueError(f"--decode must be one of {DECODERS}, got {decode!r}")
    vae = vae or facts.get("vae") or (PIXEL if channels == 3 else DEFAULT_VAE)
    if vae == PIXEL:
        if channels != 3:
            raise ValueError(f"a pixel-space model has 3 latent channels, this one has {channels}")
        return DecodeSpec(decode if decode == "none" else PIXEL, PIXEL, 1.0, 0.0)
    if scale is None:
        scale = facts.get("latent_scale") or REFERENCE_LATENT_SCALE
    return DecodeSpec(decode, vae, float(scale), float(facts.get("latent_shift") or 0.0))


def pixels_from_unit(x_NCHW: np.ndarray) -> np.ndarray:
    """Pixel-space model output in [-1, 1] (NCHW) → uint8 NHWC."""
    return images.to_uint8(np.asarray(x_NCHW, np.float32).transpose(0, 2, 3, 1) / 2 + 0.5)


@functools.lru_cache(maxsize=2)
def _jax_vae(vae: str):
    # One loaded copy per VAE for the process, whatever batch sizes decoders are made for.
    from at1_jax.decode.vae_weights import load_vae_decoder

    return load_vae_decoder(vae)[0]


def make_decoder(spec: DecodeSpec, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """x0 latents (N, C, h, w) → uint8 NHWC images, in fixed-size batches (VAE loaded once)."""
    if spec.mode == PIXEL:
        return lambda x0: pixels_from_unit(x0 * spec.latent_scale + spec.latent_shift)
    if spec.mode == "none":
        return lambda x0: images.to_uint8(images.latents_to_images(x0))
    if spec.mode == "torch":
        from at1_jax import torch_bridge

        dec = torch_bridge.torch_vae_decoder(spec.vae)
        return lambda x0: dec.decode(
            (x0 * spec.latent_scale + spec.latent_shift).astype(np.float32), batch_size
        )
    vae = _jax_vae(spec.vae)

    def decode(x0):
        out = []
        for i in range(0, len(x0), batch_size):
            z = np.zeros((batch_size, *x0.shape[1:]), np.float32)  # one compiled shape
            n = min(batch_size, len(x0) - i)
            z[:n] = x0[i : i + n] * spec.latent_scale + spec.latent_shift
            out.append(np.asarray(vae.decode_to_images(jnp.asarray(z), uint8=True))[:n])
        return np.concatenate(out)

    return decode
