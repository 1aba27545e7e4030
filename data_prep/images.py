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


# The white level of integer data is the smallest of these bit-depth maxima that holds the
# image's maximum (10- and 12-bit sensor data is stored in 16- and 32-bit containers).
BIT_DEPTH_MAXIMA = (255, 1023, 4095, 16383, 65535)


def to_8bit(a: np.ndarray, white: float | None = None) -> np.ndarray:
    """Scale pixel values to uint8 (``white`` → 255, None: read from the values) or ImageSkip."""
    # White read from the values: 1.0 for floats within [0, 1], else the smallest bit-depth
    # maximum that holds the largest value. Non-finite or negative values, or values above
    # 16 bits, have no such reading.
    floats = np.asarray(a).dtype.kind == "f"
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        raise ImageSkip("nonfinite_image", f"{a.size - int(finite.sum())} NaN/inf pixels")
    lo, hi = float(a.min()), float(a.max())
    if white is None:
        white = (
            1.0 if floats and hi <= 1.0 else next((m for m in BIT_DEPTH_MAXIMA if hi <= m), None)
        )
    if lo < 0 or white is None:
        raise ImageSkip("unsupported_pixel_values", f"values {lo:g}..{hi:g}: not 0..1 or 0..65535")
    return np.clip(np.round(a / white * 255.0), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels go onto white."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img)
        sixteen = mode.startswith("I;16")  # the file says 16 bits: white is 65535
        a8 = to_8bit(a, 65535.0 if sixteen else None)
        repair = "mode_16bit" if sixteen else {"I": "mode_int32", "F": "mode_float"}[mode]
        return Image.fromarray(a8, "L").convert("RGB"), repair
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
    """Wrap an HxW or HxWxC array (tfds images) as a decoded image, scaled as to_8bit reads it."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint8:
        return from_pil(Image.fromarray(a), min_size)
    if a.dtype == np.bool_:
        return from_pil(Image.fromarray(a.astype(np.uint8) * 255), min_size)
    # Pillow has no 16-bit or float RGB mode: scale here and record what was done.
    white = 65535.0 if a.dtype == np.uint16 else None
    repair = (
        "mode_16bit"
        if a.dtype == np.uint16
        else ("mode_float" if a.dtype.kind == "f" else "mode_int32")
    )
    dec = from_pil(Image.fromarray(to_8bit(a, white)), min_size)
    dec.original_mode, dec.repair = str(a.dtype), repair
    return dec


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
