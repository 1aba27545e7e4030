"""FID and CLIP score of generated images over a guidance sweep on a COCO-style caption set."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from at1_io import storage
from at1_jax.decode import images
from at1_jax.evaluate import inception, metrics
from at1_jax.generate import pipeline as sample
from at1_jax.model.samplers import SamplerConfig

GRID_COLUMNS = 8

# images uint8 NHWC -> features f32[N, D]
FeatureExtractor = Callable[[np.ndarray], np.ndarray]


def inception_extractor(path: str, batch_size: int = 32) -> FeatureExtractor:
    """pytorch-fid pool3 features; batches are padded to one shape so XLA compiles once."""
    params = inception.load(path)

    def extract(imgs: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(imgs), batch_size):
            n = min(batch_size, len(imgs) - i)
            batch = np.zeros((batch_size, *imgs.shape[1:]), np.uint8)
            batch[:n] = imgs[i : i + n]
            out.append(np.asarray(inception.features_jit(params, jnp.asarray(batch)))[:n])
        return np.concatenate(out)

    return extract


def read_coco_captions(path: str, num: int) -> list[tuple[str, str]]:
    """(file_name, caption) for the first `num` images by id, each with its first caption."""
    coco = json.loads(storage.read_bytes(path))
    try:
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        first: dict[int, str] = {}
        for ann in coco["annotations"]:
            first.setdefault(ann["image_id"], ann["caption"].strip())
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a COCO captions file (needs images[].id/file_name and "
            f"annotations[].image_id/caption): {e!r}"
        ) from e
    pairs = [(names[i], first[i]) for i in sorted(first) if i in names]
    if len(pairs) < num:
        raise ValueError(f"{path}: {len(pairs)} captioned images, fewer than --num-images {num}")
    return pairs[:num]


def load_reference(path: str, size: int) -> np.ndarray:
    """uint8 HWC: center-cropped to a square, resized to size×size (bicubic), RGB."""
    img = Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def reference_stats(
    files: Sequence[str], size: int, extract: FeatureExtractor, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the reference images' features."""
    stats = None
    for i in range(0, len(files), chunk):
        feats = extract(np.stack([load_reference(p, size) for p in files[i : i + chunk]]))
        stats = stats or metrics.RunningStats(feats.shape[1])
        stats.update(feats)
    return stats.stats()


def _cached_reference_stats(files, size, extract, key_parts, cache_dir):
    key = hashlib.sha256(json.dumps([list(files), size, *key_parts]).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, "fid_refs", key + ".npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            return z["mu"], z["sigma"]
    mu, sigma = reference_stats(files, size, extract)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", mu=mu, sigma=sigma)
    os.replace(path + ".tmp.npz", path)
    return mu, sigma


def parse_guidance(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--guidance {text!r}: expected numbers separated by commas") from e
    if not values:
        raise ValueError("--guidance: no values")
    return values


def evaluate(
    args, pipe: sample.Pipeline, extract: FeatureExtractor | None, clip, ref_key: list | None
) -> dict:
    """Runs the sweep; returns the report dict. ref_key: cache key parts of the extractor."""
    pairs = read_coco_captions(args.captions, args.num_images)
    captions = [c for _, c in pairs]
    files = [f"{args.images.rstrip('/')}/{name}" for name, _ in pairs]
    report = {
        "checkpoint": args.checkpoint,
        "checkpoint_info": pipe.info,
        "text_encoder": pipe.text_encoder,
        "decode": dataclasses.asdict(pipe.decode_spec),
        "num_images": len(pairs),
        "captions": args.captions,
        "reference_images": args.images,
        "preprocessing": {
            "reference": "center crop to square, PIL bicubic resize to the generated size, RGB",
            "fid": "pytorch-fid InceptionV3 pool3 (2048-d): bilinear resize to 299x299 "
            "(align_corners=False, no antialias), x/255*2-1",
            "clip": "CLIP image processor and tokenizer of the CLIP model (as torchmetrics)",
        },
        "seeds": f"caption i uses seed {args.seed} + i",
        "rows": [],
    }
    ref: list = []  # (mean, covariance), computed once the generated image size is known

    def reference(size: int):
        if not ref:
            t0 = time.perf_counter()
            if ref_key is None:
                ref.extend(reference_stats(files, size, extract))
            else:
                ref.extend(_cached_reference_stats(files, size, extract, ref_key, args.cache_dir))
            report["image_size"] = size
            report["reference_features_s"] = time.perf_counter() - t0
        return ref

    text_emb = clip.text_embeds(captions) if clip is not None else None
    grid_rows = []
    guidance = parse_guidance(args.guidance)
    bar = tqdm(
        total=len(pairs) * len(guidance), unit="img", desc="generating", disable=args.no_progress
    )
    for g in guidance:
        sampler = SamplerConfig(steps=args.steps, guidance=g, sampler=args.sampler)
        stats, clip_vals, t0 = None, [], time.perf_counter()
        for i in range(0, len(pairs), args.chunk):
            idx = range(i, min(i + args.chunk, len(pairs)))
            imgs, _ = pipe.generate(
                [captions[j] for j in idx], [args.seed + j for j in idx], sampler, bar.update
            )
            if i == 0:
                grid_rows.append([])
            for j, img in zip(idx, imgs[: GRID_COLUMNS - len(grid_rows[-1])], strict=False):
                grid_rows[-1].append((img, f"{captions[j]}\nseed {args.seed + j} · guidance {g:g}"))
            if args.save_images:
                for j, img in zip(idx, imgs, strict=True):
                    images.save_png(img, os.path.join(args.out, f"g{g:g}", f"{j:05d}.png"))
            if extract is not None:
                feats = extract(imgs)
                stats = stats or metrics.RunningStats(feats.shape[1])
                stats.update(feats)
            if clip is not None:
                clip_vals.append(metrics.clip_scores(clip.image_embeds(imgs), text_emb[list(idx)]))
        row = {"guidance": g, "seconds": time.perf_counter() - t0}
        if extract is not None:
            row["fid"] = metrics.frechet_distance(*stats.stats(), *reference(imgs.shape[1]))
        if clip is not None:
            row["clip_score"] = float(np.concatenate(clip_vals).mean())
        report["rows"].append(row)
    bar.close()
    report["sampler"] = {"steps": args.steps, "sampler": args.sampler}
    report["timing_s"] = dict(pipe.timing)
    cells = [cell for row in grid_rows for cell in row]
    title = f"{args.checkpoint} · {args.sampler} {args.steps} steps · one row per guidance"
    pages = images.sheet(
        np.stack([im for im, _ in cells]), [c for _, c in cells], title, ncols=len(grid_rows[0])
    )
    report["sheets"] = images.save_pages(pages, os.path.join(args.out, "grid.png"))
    return report
