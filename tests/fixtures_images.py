"""Generated test images and image folders (random pixels, sidecar captions and licenses)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def random_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth-ish random RGB uint8 image (a blurred noise field, so JPEG/PNG stay small)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def png_bytes(img: Image.Image) -> bytes:
    """PNG-encoded bytes of a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb look-alike)."""
    data = png_bytes(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + patched + data[8 + 25 :]


def write_image_folder(
    root: Path,
    n: int,
    size: tuple[int, int] = (40, 48),
    license: str = "CC BY 2.0",
    seed: int = 0,
) -> list[np.ndarray]:
    """n PNG images with .txt captions and .json (license, url); returns the pixel arrays."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        a = random_rgb(size[0] + i, size[1], seed + i)
        Image.fromarray(a).save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"a red square  with a   tree {i}\n")
        meta = {"license": license, "url": f"http://example.com/{i}.png"}
        (root / f"img{i:03d}.json").write_text(json.dumps(meta))
        arrays.append(a)
    return arrays
