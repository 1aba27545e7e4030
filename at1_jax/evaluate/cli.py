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
import json
import os
import sys

from at1_io import storage
from at1_io.help_format import DefaultsHelpFormatter
from at1_jax import torch_bridge
from at1_jax.checkpointing import model_card
from at1_jax.evaluate import inception
from at1_jax.evaluate.sweep import (
    FeatureExtractor,
    evaluate,
    inception_extractor,
    parse_guidance,
    read_coco_captions,
)
from at1_jax.evaluate.val_loss import validation_loss
from at1_jax.generate import pipeline as sample
from at1_jax.model.samplers import SAMPLERS, SamplerConfig
from at1_jax.train.config import LogConfig
from at1_jax.train.data import DataError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer files")
DEFAULT_INCEPTION = os.path.join(sample.DEFAULT_CACHE, inception.WEIGHTS_FILE)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_jax.evaluate",
        description=__doc__.split("\n")[0],
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
    p.add_argument(
        "--guidance",
        default=f"{SamplerConfig.guidance:g}",
        help="comma-separated values, one report row each",
    )
    p.add_argument("--steps", type=int, default=SamplerConfig.steps)
    p.add_argument("--sampler", default="dpmpp2m", choices=SAMPLERS)
    p.add_argument(
        "--seed", type=int, default=SamplerConfig.seed, help="caption i uses seed + i (as sample)"
    )
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
        for g in parse_guidance(args.guidance):  # every sampler setting checked before work
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
