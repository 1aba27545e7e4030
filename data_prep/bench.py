"""Benchmark: pipeline images/s against the bare encoder forwards on the same images.

``python -m data_prep.encode [encode options] --benchmark [--benchmark-images N]``; INPUT
``synthetic`` generates N random JPEGs (512x384, captions, CC0) instead of reading a dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from PIL import Image

from data_prep import images, input_items, pipeline, sources
from data_prep.models import Models
from data_prep.settings import EncodeSettings
from data_prep.workdir import work_dir

SYNTHETIC = "synthetic"


def synthetic_folder(root: str, n: int, size: tuple[int, int] = (512, 384)) -> None:
    """n random JPEGs with captions and a CC0 license."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
        img.save(os.path.join(root, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(root, f"{i:06d}.txt"), "w") as f:
            f.write(f"a synthetic test picture number {i} with smooth random colours")
        with open(os.path.join(root, f"{i:06d}.json"), "w") as f:
            json.dump({"license": "cc0"}, f)


def _timed(fn, batches: list, repeat_to: int) -> float:
    """Images/s of fn over batches, cycled until repeat_to images (after one warm-up call)."""
    fn(batches[0])
    done, start, i = 0, time.perf_counter(), 0
    while done < repeat_to:
        b = batches[i % len(batches)]
        fn(b)
        done, i = done + len(b), i + 1
    return done / (time.perf_counter() - start)


def run(s: EncodeSettings, n_images: int) -> dict:
    """Time the full pipeline on n_images inputs, then the bare forwards on the same images."""
    with work_dir() as tmp:
        if s.input == SYNTHETIC:
            synthetic_folder(os.path.join(tmp, "in"), n_images)
            s = dataclasses.replace(s, input=os.path.join(tmp, "in"))
        s = dataclasses.replace(s, output=os.path.join(tmp, "out"), shard_size=n_images)
        result = pipeline.run(s)
        source = sources.open_source(s.input, s.input_format, n_images, s.image_column,
                                     s.caption_column, s.split, s.tfds_data_dir)  # fmt: skip
        items = [x for x in source.iter_group(0) if isinstance(x, input_items.RawSample)]
    models = Models(s)
    pixels, texts = [], []
    for item in items:
        try:
            if item.image_array is not None:
                dec = images.from_array(item.image_array)
            else:
                dec = images.decode_image(item.image_bytes or b"", 0, s.max_pixels)
        except images.ImageSkip:
            continue
        pixels.append(images.to_model_input(images.resize_center_crop(dec.image, s.resolution)))
        texts.append(item.caption or "")
    bs = s.batch_size
    pix_batches = [np.stack(pixels[i : i + bs]) for i in range(0, len(pixels), bs)]
    text_batches = [texts[i : i + bs] for i in range(0, len(texts), bs)]
    report = {
        "device": models.device,
        "dtype": str(models.dtype).removeprefix("torch."),
        "images": result.images,
        "batch_size": bs,
        "resolution": s.resolution,
        "pipeline_images_per_s": result.images / result.seconds,
        "vae_images_per_s": _timed(models.ae.encode, pix_batches, len(pixels)),
    }
    for enc in models.text:
        report[f"text_{enc.spec.name}_images_per_s"] = _timed(enc.encode, text_batches, len(texts))
    rates = [v for k, v in report.items() if k.startswith(("vae_", "text_"))]
    report["bare_encoders_images_per_s"] = 1.0 / sum(1.0 / r for r in rates)
    report["pipeline_fraction_of_bare"] = (
        report["pipeline_images_per_s"] / report["bare_encoders_images_per_s"]
    )
    return report


def print_report(report: dict) -> None:
    """Human-readable report on stdout, then the same as one JSON line."""
    for k, v in report.items():
        print(f"{k:36s} {v:.2f}" if isinstance(v, float) else f"{k:36s} {v}")
    print(json.dumps(report))
