"""Text-to-image with a trained or imported denoiser: prompts → PNG files.

python -m at1_jax.sample --checkpoint PATH --prompt "a red square" --num 4 --out DIR

Prompts are embedded on the PyTorch side (data_prep's text encoders, imported only when a
prompt is not in the embedding cache), denoised in JAX (one jitted sampler per batch shape),
and decoded by the Flax VAE decoder (default), diffusers in PyTorch (`--decode torch`), or
the identity map for pixel-space models. Image k of a prompt starts from the noise of seed
`--seed + k`, so any image can be remade alone and the same seed gives the same PNG bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from at1_io.constants import DEFAULT_TEXT_ENCODER, DEFAULT_VAE
from at1_jax.checkpointing.load import DEFAULT_CACHE, MissingFiles
from at1_jax.decode import images
from at1_jax.decode.pixels import DECODERS
from at1_jax.generate.pipeline import Pipeline
from at1_jax.model.samplers import SAMPLERS, SamplerConfig
from at1_jax.torch_bridge import MissingExtra


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts-file."""
    out = list(prompt or [])
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT and/or --prompts-file FILE")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m at1_jax.sample", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="weights folder or training run (local or s3://)"
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--sampler", default="dpmpp2m", choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=11, help="image k of each prompt uses seed + k")
    p.add_argument("--num", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="outputs/sample")
    p.add_argument("--decode", default="jax", choices=DECODERS)
    p.add_argument(
        "--vae",
        help=f"diffusers VAE id/folder, or 'pixel' (default: from the "
        f"checkpoint, else {DEFAULT_VAE})",
    )
    p.add_argument(
        "--text-encoder",
        help=f"[kind=]id or folder (default: from the checkpoint, else {DEFAULT_TEXT_ENCODER})",
    )
    p.add_argument("--latent-scale", type=float, help="raw VAE latent = x0 · this (default 8)")
    p.add_argument("--sharp-f", type=float, default=0.0, help="added to latent channel 3")
    p.add_argument("--bright-f", type=float, default=0.0, help="added to latent channel 0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="text-embedding cache")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        if args.num < 1 or args.batch_size < 1:
            raise ValueError("--num and --batch-size must be >= 1")
        sampler = SamplerConfig(
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            sharp_f=args.sharp_f,
            bright_f=args.bright_f,
            seed=args.seed,
        )
        pipe = Pipeline.from_args(args)
        pipe.require(prompts)
    except (MissingFiles, MissingExtra, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_prompts = [p for p in prompts for _ in range(args.num)]
    seeds = [args.seed + k for _ in prompts for k in range(args.num)]
    t0 = time.perf_counter()
    imgs, x0 = pipe.generate(all_prompts, seeds, sampler)
    total = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    records = []
    for i, (prompt, seed) in enumerate(zip(all_prompts, seeds, strict=True)):
        name = f"{i:05d}.png"
        images.save_png(imgs[i], os.path.join(args.out, name))
        records.append({"file": name, "prompt": prompt, "seed": seed})
    images.save_png(
        images.grid(imgs[:64], ncols=min(args.num, 8)), os.path.join(args.out, "grid.png")
    )
    if args.decode == "none":
        np.save(os.path.join(args.out, "latents.npy"), x0)
    settings = {
        "checkpoint": args.checkpoint,
        "checkpoint_info": pipe.info,
        "text_encoder": pipe.text_encoder,
        "decode": dataclasses.asdict(pipe.decode_spec),
        "sampler": dataclasses.asdict(sampler),
        "batch_size": args.batch_size,
        "backend": jax.default_backend(),
        "images": records,
        "timing_s": {**pipe.timing, "total": total},
    }
    with open(os.path.join(args.out, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    print(
        f"wrote {len(imgs)} images + grid.png + settings.json to {args.out} in {total:.1f} s "
        f"(embed {pipe.timing['embed_s']:.1f}, denoise {pipe.timing['denoise_s']:.1f} incl. "
        f"compile, decode {pipe.timing['decode_s']:.1f})"
    )
    return 0
