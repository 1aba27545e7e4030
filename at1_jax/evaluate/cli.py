"""FID and CLIP score of a checkpoint on a COCO-style caption set, with a guidance sweep.

python -m at1_jax.evaluate --checkpoint W --captions captions_val2014.json \
    --images s3://bucket/val2014 --num-images 1000 --guidance 3,4.5,6 --out eval/

For the first N images (sorted by COCO image id) it takes each image's first caption,
generates one image per caption (caption i from seed `--seed + i`), and compares:
- FID: pytorch-fid's Inception-v3 pool3 features (at1_jax.evaluate.inception) of the generated
  images against those of the reference images. References are center-cropped to a square
  and resized (PIL bicubic) to the generated size; both sets then go through the Inception
  preprocessing (bilinear resize to 299, [0, 1] → [-1, 1]). FID falls as N grows: compare
  only numbers with the same N, resolution and reference set.
- CLIP score: 100·max(cos, 0) between CLIP image and caption embeddings, averaged.
Writes report.json (one row per guidance value) and grid.png (a row of images per value).

python -m at1_jax.evaluate --checkpoint W --val-loss DATASET computes the validation loss the
trainer logs (at1_jax.train.validation: the first --val-samples samples of DATASET's val/
split, or of its shards if it has none, at --val-bins fixed noise levels with fixed noise),
so runs compare after the fact: on RUN/weights it is the run's last val_loss_ema.
Both can run at once. Results go into the weights folder's model card (evaluations).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from at1_io import schema, storage
from at1_jax import torch_bridge
from at1_jax.checkpointing import model_card
from at1_jax.checkpointing.load import card_of, load_model
from at1_jax.decode import images
from at1_jax.evaluate import inception, metrics
from at1_jax.generate import pipeline as sample
from at1_jax.model.samplers import SAMPLERS, SamplerConfig
from at1_jax.train import sharding, validation
from at1_jax.train.config import LogConfig
from at1_jax.train.data import DataError, open_dataset

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer files")
DEFAULT_INCEPTION = os.path.join(sample.DEFAULT_CACHE, inception.WEIGHTS_FILE)
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


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- run


def _parse_guidance(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--guidance {text!r}: expected numbers separated by commas") from e
    if not values:
        raise ValueError("--guidance: no values")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m at1_jax.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="weights folder (local or s3://)")
    p.add_argument("--captions", help="COCO captions JSON (local or s3://), for FID/CLIP")
    p.add_argument("--images", help="reference images folder (local or s3://), for FID/CLIP")
    p.add_argument(
        "--val-loss",
        metavar="DATASET",
        help="data set root: the trainer's validation loss on its val/ split (else its shards)",
    )
    p.add_argument("--val-samples", type=int, default=LogConfig.val_samples)
    p.add_argument("--val-bins", type=int, default=LogConfig.val_bins)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--guidance", default="6", help="comma-separated values, one report row each")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--sampler", default="dpmpp2m", choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=0, help="caption i uses seed + i")
    p.add_argument("--metrics", default="fid,clip", help="fid, clip, or both")
    p.add_argument("--inception-weights", default=DEFAULT_INCEPTION)
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP hub id or folder")
    p.add_argument("--text-encoder")
    p.add_argument("--vae")
    p.add_argument("--decode", default="jax", choices=("jax", "torch"))
    p.add_argument("--latent-scale", type=float)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=256, help="images generated between metric updates")
    p.add_argument("--save-images", action="store_true", help="also write every generated PNG")
    p.add_argument("--cache-dir", default=sample.DEFAULT_CACHE)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="outputs/evaluate")
    return p


def _check_files(args, want: set[str], need_inception: bool) -> sample.Pipeline:
    """Every missing file at once, before any work: raises MissingFiles listing them all."""
    problems, pipe = [], None
    if need_inception and not os.path.isfile(args.inception_weights):
        problems.append(inception.missing_weights_message(args.inception_weights))
    if "clip" in want:
        try:
            sample.require_model("CLIP model", "--clip-model", args.clip_model, CLIP_FILES)
        except sample.MissingFiles as e:
            problems.append(str(e))
    for what, path in (("captions file", args.captions), ("reference images", args.images)):
        if not storage.exists(path):
            problems.append(f"{what} {path} not found")
    captions = None
    if storage.exists(args.captions):
        captions = [c for _, c in read_coco_captions(args.captions, args.num_images)]
    try:
        pipe = sample.Pipeline.from_args(args)
    except sample.MissingFiles as e:
        problems.append(str(e))
    if pipe is not None:
        try:
            sample.require_decoder(pipe.decode_spec)
        except sample.MissingFiles as e:
            problems.append(str(e))
        try:  # the text encoder is needed only for captions not in the embedding cache
            pipe.require(captions or [""])
        except sample.MissingFiles as e:
            problems.append(str(e))
    if problems:
        raise sample.MissingFiles("\n".join(f"- {p}" for p in problems))
    return pipe


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
    guidance = _parse_guidance(args.guidance)
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


def validation_loss(args, announce: bool = True) -> dict:
    """The trainer's validation loss of the checkpoint's weights on `args.val_loss`."""
    model, info = load_model(args.checkpoint, args.cache_dir)
    if announce:  # the FID/CLIP pipeline has printed it already
        print(f"model: {info['summary']}", flush=True)
    card = card_of(args.checkpoint) or {}
    record = (card.get("data") or [{}])[0]
    # The text array and latent scale the weights were trained with, when their card says.
    ds = open_dataset(
        args.val_loss, record.get("text_array") or "", record.get("latent_scale") or 0
    )
    cfg = model.cfg
    want = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    if tuple(ds.latent_shape) != want or ds.text_dim != cfg.text_dim:
        raise ValueError(
            f"--val-loss {args.val_loss}: latents {tuple(ds.latent_shape)} and {ds.text_dim}-d "
            f"text do not fit the model ({want}, {cfg.text_dim}-d): use the data set it was "
            "trained on or one encoded alike"
        )
    split = schema.VAL if ds.manifest.val_shards else schema.TRAIN
    vset = validation.load_split(ds, split, args.val_samples)
    mesh = sharding.make_mesh(data=-1)  # every local device, weights replicated
    devices = mesh.devices.size
    chunk = -(-args.batch_size // devices) * devices
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    validator = validation.Validator(vset, graphdef, mesh, args.val_bins, chunk)
    losses = validator.losses(nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), "val_loss")
    return {"set": vset.describe(), "bins": validation.bin_names(args.val_bins), **losses}


def _record_in_card(checkpoint: str, kind: str, results: dict) -> None:
    try:
        card = model_card.add_evaluation(checkpoint, kind, results)
    except model_card.CardError as e:
        print(f"warning: {e}: the results are only in report.json", file=sys.stderr)
        return
    if card is None:
        print(f"{checkpoint} has no model card file: the results are only in report.json")
    else:
        print(f"added to the model card: {storage.join(checkpoint, model_card.MARKDOWN_FILE)}")


def main(argv=None, feature_extractor: FeatureExtractor | None = None) -> int:
    """CLI entry; `feature_extractor` replaces the Inception network (tests use tiny ones)."""
    args = _parser().parse_args(argv)
    want = {m.strip() for m in args.metrics.split(",") if m.strip()}
    sweep = bool(args.captions or args.images)
    try:
        if sweep and not (args.captions and args.images):
            raise ValueError("FID/CLIP need both --captions and --images")
        if not sweep and not args.val_loss:
            raise ValueError(
                "nothing to evaluate: give --captions and --images (FID, CLIP score), "
                "--val-loss DATASET (validation loss), or both"
            )
        if args.val_samples < 1 or args.val_bins < 1 or args.batch_size < 1:
            raise ValueError("--val-samples, --val-bins and --batch-size must be >= 1")
        if not sweep:
            os.makedirs(args.out, exist_ok=True)
            return _val_loss_only(args)
        if not want or want - {"fid", "clip"}:
            raise ValueError(f"--metrics {args.metrics!r}: choose from fid, clip")
        for g in _parse_guidance(args.guidance):  # every sampler setting checked before work
            SamplerConfig(steps=args.steps, guidance=g, sampler=args.sampler)
        if args.num_images < 2 and "fid" in want:
            raise ValueError("--num-images must be >= 2 for FID (it needs a covariance)")
        need_inception = "fid" in want and feature_extractor is None
        pipe = _check_files(args, want, need_inception)
        extract, ref_key = None, None
        if "fid" in want and feature_extractor is not None:
            extract = feature_extractor
        elif "fid" in want:  # a bad weights file is an error line here, not a traceback later
            extract = inception_extractor(args.inception_weights, args.batch_size)
            w = args.inception_weights
            ref_key = [os.path.abspath(w), os.path.getsize(w), os.path.getmtime(w)]
        clip = torch_bridge.clip_embedder(args.clip_model) if "clip" in want else None
        print(f"model: {pipe.info['summary']}", flush=True)
        val = validation_loss(args, announce=False) if args.val_loss else None
    except (
        sample.MissingFiles,
        torch_bridge.MissingExtra,
        DataError,
        model_card.CardError,
        ValueError,
        OSError,
    ) as e:
        print(f"error: cannot evaluate:\n{e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = evaluate(args, pipe, extract, clip, ref_key)
    if ref_key is not None:
        report["inception_weights"] = args.inception_weights
    if val is not None:
        report["validation_loss"] = val
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for row in report["rows"]:
        print(
            f"guidance {row['guidance']:g}: "
            + ", ".join(f"{k} {row[k]:.3f}" for k in ("fid", "clip_score") if k in row)
            + f" ({report['num_images']} images, {row['seconds']:.1f} s)"
        )
    if val is not None:
        _print_val(val)
    print(f"wrote {os.path.join(args.out, 'report.json')} and grid.png")
    sweep_results = {
        k: report[k] for k in ("num_images", "captions", "reference_images", "sampler", "rows")
    }
    _record_in_card(args.checkpoint, "fid_clip", sweep_results)
    if val is not None:
        _record_in_card(args.checkpoint, "validation_loss", val)
    return 0


def _print_val(val: dict) -> None:
    bins = ", ".join(f"{b} {val[f'val_loss_{b}']:.5f}" for b in val["bins"])
    print(f"validation loss {val['val_loss']:.5f} on {val['set']} ({bins})")


def _val_loss_only(args) -> int:
    try:
        val = validation_loss(args)
    except (sample.MissingFiles, DataError, model_card.CardError, ValueError, OSError) as e:
        print(f"error: cannot evaluate:\n{e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"checkpoint": args.checkpoint, "validation_loss": val}, f, indent=2)
    _print_val(val)
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    _record_in_card(args.checkpoint, "validation_loss", val)
    return 0
