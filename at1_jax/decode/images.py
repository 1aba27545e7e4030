"""Turning arrays into PNG files: image grids and a latent preview."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images_NHWC) -> np.ndarray:
    """Float images in [0, 1] (clipped) → uint8."""
    return (np.clip(np.asarray(images_NHWC, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def latents_to_images(latents_NCHW) -> np.ndarray:
    """A viewable NHWC preview of latents: the first 3 channels, each min-max scaled."""
    x = np.asarray(latents_NCHW, np.float32)[:, :3]
    if x.shape[1] < 3:
        x = np.concatenate([x] + [x[:, :1]] * (3 - x.shape[1]), axis=1)
    lo = x.min(axis=(0, 2, 3), keepdims=True)
    hi = x.max(axis=(0, 2, 3), keepdims=True)
    return ((x - lo) / np.maximum(hi - lo, 1e-8)).transpose(0, 2, 3, 1)


def grid(images_NHWC, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N images (uint8 or [0, 1] float, NHWC) into one uint8 image with white gaps."""
    imgs = images_NHWC if images_NHWC.dtype == np.uint8 else to_uint8(images_NHWC)
    n, h, w, c = imgs.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = imgs[i]
    return out


def save_png(image_HWC, path: str) -> str:
    """Write one uint8 image; the file appears complete (written aside, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(image_HWC.squeeze(-1) if image_HWC.shape[-1] == 1 else image_HWC).save(
        tmp, format="PNG"
    )
    os.replace(tmp, path)
    return path
