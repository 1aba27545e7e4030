"""Turning arrays into PNG files: image grids and a latent preview."""

from __future__ import annotations

import io
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


def png_bytes(image_HWC) -> bytes:
    """One uint8 image as PNG bytes (what save_png writes, byte for byte)."""
    buf = io.BytesIO()
    Image.fromarray(image_HWC.squeeze(-1) if image_HWC.shape[-1] == 1 else image_HWC).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def save_png(image_HWC, path: str) -> str:
    """Write one uint8 image; the file appears complete (written aside, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png_bytes(image_HWC))
    os.replace(tmp, path)
    return path


SHEET_MIN_CELL = 128  # small images are upscaled (nearest neighbour) to at least this
SHEET_PER_PAGE = 48
TITLE_LINE_H = 20  # 16-px title font plus leading


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled font: no system fonts needed


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels per paragraph; an overlong word is cut."""
    return [line for para in text.split("\n") for line in _wrap_paragraph(para, font, width)]


def _wrap_paragraph(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > width:
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return [*lines, line] if line else lines


def sheet(
    images_NHWC,
    captions: list[str],
    title: str,
    ncols: int | None = None,
    per_page: int = SHEET_PER_PAGE,
) -> list[np.ndarray]:
    """Labelled pages: each image (upscaled if small) with its wrapped caption under it.

    Every image and caption appears: past `per_page` images the sheet continues on more
    pages (title "… page k/n"), never cut.
    """
    from PIL import Image, ImageDraw

    imgs = images_NHWC if images_NHWC.dtype == np.uint8 else to_uint8(images_NHWC)
    if len(captions) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(captions)} captions")
    n, h, w, _ = imgs.shape
    scale = max(1, math.ceil(SHEET_MIN_CELL / max(h, w)))
    cw, ch = w * scale, h * scale
    font, title_font, pad = _font(12), _font(16), 8
    line_h = 15
    pages = max(1, math.ceil(n / per_page))
    out = []
    for page in range(pages):
        idx = range(page * per_page, min(n, (page + 1) * per_page))
        cols = ncols or min(len(idx), max(1, math.ceil(math.sqrt(len(idx)))))
        rows = math.ceil(len(idx) / cols)
        texts = {i: _wrap(captions[i], font, cw) for i in idx}
        text_h = line_h * max((len(t) for t in texts.values()), default=0)
        cell_h = ch + text_h + pad
        head = title if pages == 1 else f"{title} (page {page + 1}/{pages})"
        width = pad + cols * (cw + pad)
        head_lines = _wrap(head, title_font, width - 2 * pad)  # a narrow sheet wraps its title
        top = 10 + TITLE_LINE_H * len(head_lines)
        canvas = Image.new("RGB", (width, top + rows * cell_h + pad), "white")
        draw = ImageDraw.Draw(canvas)
        for j, line in enumerate(head_lines):
            draw.text((pad, 6 + j * TITLE_LINE_H), line, fill="black", font=title_font)
        for k, i in enumerate(idx):
            r, c = divmod(k, cols)
            x, y = pad + c * (cw + pad), top + r * cell_h
            tile = Image.fromarray(imgs[i].squeeze(-1) if imgs.shape[-1] == 1 else imgs[i])
            canvas.paste(tile.resize((cw, ch), Image.Resampling.NEAREST), (x, y))
            for j, line in enumerate(texts[i]):
                draw.text((x, y + ch + 2 + j * line_h), line, fill="black", font=font)
        out.append(np.asarray(canvas))
    return out


def save_pages(pages: list[np.ndarray], path: str) -> list[str]:
    """Write sheet pages as `path` (page 1) and `stem-2.png`, `stem-3.png`…; returns the paths."""
    stem, ext = os.path.splitext(path)
    return [save_png(p, path if k == 0 else f"{stem}-{k + 1}{ext}") for k, p in enumerate(pages)]
