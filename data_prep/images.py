"""Image decoding with bad-input handling, RGB normalisation, resize and center crop."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb error threshold (2x its warning)


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is the manifest's skip-count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class DecodedImage:
    """An RGB 8-bit image, its original size and mode, and the repair applied, if any."""

    image: Image.Image
    original_size: tuple[int, int]
    original_mode: str
    repair: str | None


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels go onto white."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a8 = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB"), "mode_16bit"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode == "CMYK":
        return img.convert("RGB"), "mode_cmyk"
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), "mode_alpha"
    return img.convert("RGB"), f"mode_{mode.lower().replace(';', '')}"


def decode_image(
    data: bytes, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode encoded image bytes to RGB, or raise ImageSkip with the reason."""
    if not data:
        raise ImageSkip("empty_image")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        # Our own limit, checked before any pixel is decoded (Pillow's is a global).
        if w * h > max_pixels:
            raise ImageSkip("too_large", f"{w}x{h} > {max_pixels} pixels")
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageSkip("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageSkip("corrupt_image", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise ImageSkip(reason, str(e)) from e
    return from_pil(img, min_size)


def from_pil(img: Image.Image, min_size: int = 0) -> DecodedImage:
    """Normalise an already-open PIL image (EXIF rotation, RGB), checking --min-size."""
    original_mode = img.mode
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError):
        pass  # a broken EXIF block is no reason to drop the pixels
    if min(img.size) < max(min_size, 1):
        raise ImageSkip("too_small", f"{img.size[0]}x{img.size[1]} < {min_size}")
    size = img.size
    rgb, repair = _to_rgb(img)
    return DecodedImage(rgb, size, original_mode, repair)


def from_array(a: np.ndarray, min_size: int = 0) -> DecodedImage:
    """Wrap an HxW or HxWxC uint8/uint16 array (tfds images) as a decoded image."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16 and a.ndim == 3:
        a = (a >> 8).astype(np.uint8)  # Pillow has no 16-bit RGB mode
    img = Image.fromarray(a if a.dtype == np.uint16 else a.astype(np.uint8))
    return from_pil(img, min_size)


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` (bicubic, antialiased) and center-crop square."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_model_input(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(a.transpose(2, 0, 1))
