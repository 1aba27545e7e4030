"""Text-to-image with a trained or imported denoiser: prompts → PNG files.

python -m at1_jax.sample --checkpoint PATH --prompt "a red square" --num 4 --out DIR

Prompts are embedded on the PyTorch side (data_prep's text encoders, imported only when a
prompt is not in the embedding cache), denoised in JAX (one jitted sampler per batch shape),
and decoded by the Flax VAE decoder (default), diffusers in PyTorch (`--decode torch`), or
the identity map for pixel-space models. Image k of a prompt starts from the noise of seed
`--seed + k`, so any image can be remade alone and the same seed gives the same PNG bytes.
`--out` ends up holding exactly the files its settings.json lists: a rerun into a previous
output replaces what that run wrote, and a folder holding anything else is refused.
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
from tqdm import tqdm

from at1_io.constants import DEFAULT_TEXT_ENCODER, DEFAULT_VAE
from at1_io.help_format import DefaultsHelpFormatter
from at1_jax.checkpointing.load import DEFAULT_CACHE, MissingFiles
from at1_jax.decode import images
from at1_jax.decode.pixels import DECODERS
from at1_jax.generate.pipeline import Pipeline
from at1_jax.model.samplers import SAMPLERS, SamplerConfig
from at1_jax.torch_bridge import MissingExtra

SETTINGS_FILE = "settings.json"


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values, then the lines of --prompts-file that are neither blank nor `#` comments."""
    out = list(prompt or [])
    if prompts_file:
        with open(prompts_file, encoding="utf-8-sig") as f:  # -sig: a BOM is not prompt text.
            lines = [line.strip() for line in f]
        out += [line for line in lines if line and not line.startswith("#")]
    if not out:
        raise ValueError(
            "no prompts: pass --prompt TEXT and/or --prompts-file FILE (one prompt per line; "
            "lines starting with # are comments)"
        )
    return out


def _listed_files(settings_path: str) -> set[str] | None:
    """The files a previous run's settings.json says it wrote; None if it is not one of ours."""
    try:
        with open(settings_path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict):
        return None
    files = settings.get("files")
    images = settings.get("images")
    if files is None and isinstance(images, list) and all(isinstance(r, dict) for r in images):
        # Written before settings.json had "files": these are the names that version wrote.
        files = [r.get("file") for r in images] + ["grid.png", "latents.npy"]
    if not (isinstance(files, list) and all(isinstance(n, str) for n in files)):
        return None
    return set(files)


def previous_output(out: str) -> list[str]:
    """Files of an earlier run in `out` to replace; a ValueError if `out` holds anything else."""
    if not os.path.exists(out):
        return []
    if not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    present = sorted(os.listdir(out))
    listed = _listed_files(os.path.join(out, SETTINGS_FILE))
    if listed is None:  # no settings.json of ours: nothing there is ours.
        foreign = present
    else:
        foreign = [
            n
            for n in present
            if n not in listed | {SETTINGS_FILE} or not os.path.isfile(os.path.join(out, n))
        ]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ValueError(
            f"--out {out} holds files that no earlier `python -m at1_jax.sample` run there "
            f"lists in its {SETTINGS_FILE} ({', '.join(foreign[:5])}{more}); choose a new or "
            "empty --out, or move those files away (a rerun replaces only what a run wrote)"
        )
    # settings.json goes last (overwritten): until then the folder stays recognisably ours.
    return [n for n in present if n != SETTINGS_FILE]


def _write_settings(out: str, settings: dict) -> None:
    with open(os.path.join(out, SETTINGS_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_jax.sample",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "--checkpoint", required=True, help="weights folder or training run (local or s3://)"
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line; blank and # lines are skipped")
    p.add_argument("--steps", type=int, default=SamplerConfig.steps)
    p.add_argument(
        "--guidance",
        type=float,
        default=SamplerConfig.guidance,
        help="0: unconditional, 1: no guidance, > 1: more",
    )
    p.add_argument("--sampler", default="dpmpp2m", choices=SAMPLERS)
    p.add_argument(
        "--seed", type=int, default=SamplerConfig.seed, help="image k of each prompt uses seed + k"
    )
    p.add_argument(
        "--num-images", "--num", dest="num", type=int, default=4, help="images per prompt"
    )
    p.add_argument(
        "--out",
        default="outputs/sample",
        help="output folder: new, empty, or an earlier run's output (replaced)",
    )
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        if args.num < 1 or args.batch_size < 1:
            raise ValueError("--num-images and --batch-size must be >= 1")
        sampler = SamplerConfig(
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            sharp_f=args.sharp_f,
            bright_f=args.bright_f,
            seed=args.seed,
        )
        stale = previous_output(args.out)
        pipe = Pipeline.from_args(args)
        print(f"model: {pipe.info['summary']}", flush=True)  # what it is, what it learnt from
        pipe.require(prompts)
    except (MissingFiles, MissingExtra, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_prompts = [p for p in prompts for _ in range(args.num)]
    seeds = [args.seed + k for _ in prompts for k in range(args.num)]
    t0 = time.perf_counter()
    with tqdm(total=len(seeds), unit="img", desc="sampling", disable=args.no_progress) as bar:
        imgs, x0 = pipe.generate(all_prompts, seeds, sampler, bar.update)
    total = time.perf_counter() - t0
    records = [
        {"file": f"{i:05d}.png", "prompt": prompt, "seed": seed}
        for i, (prompt, seed) in enumerate(zip(all_prompts, seeds, strict=True))
    ]
    title = f"{args.checkpoint} · {args.sampler} {args.steps} steps · guidance {args.guidance:g}"
    captions = [f"{r['prompt']}\nseed {r['seed']} · guidance {args.guidance:g}" for r in records]
    # Up to 8 columns, a prompt's images side by side: 2 per prompt → 4 prompts a row.
    ncols = args.num * max(1, 8 // args.num) if args.num <= 8 else 8
    pages = images.sheet(imgs, captions, title, ncols=min(ncols, len(imgs)))
    sheets = ["grid.png"] + [f"grid-{k}.png" for k in range(2, len(pages) + 1)]
    files = [r["file"] for r in records] + sheets
    files += ["latents.npy"] if args.decode == "none" else []
    settings = {
        "checkpoint": args.checkpoint,
        "checkpoint_info": pipe.info,
        "text_encoder": pipe.text_encoder,
        "decode": dataclasses.asdict(pipe.decode_spec),
        "sampler": dataclasses.asdict(sampler),
        "batch_size": args.batch_size,
        "backend": jax.default_backend(),
        "images": records,
        "files": files,  # every file of --out besides this one
        "complete": False,
        "timing_s": {**pipe.timing, "total": total},
    }
    for name in stale:
        os.remove(os.path.join(args.out, name))
    os.makedirs(args.out, exist_ok=True)
    # Written first, so a run cut short still leaves a folder that the next run may replace.
    _write_settings(args.out, settings)
    for i, record in enumerate(records):
        images.save_png(imgs[i], os.path.join(args.out, record["file"]))
    images.save_pages(pages, os.path.join(args.out, "grid.png"))  # labelled, never cut
    if args.decode == "none":
        np.save(os.path.join(args.out, "latents.npy"), x0)
    _write_settings(args.out, {**settings, "complete": True})
    print(
        f"wrote {len(imgs)} images + {', '.join(sheets)} + settings.json to {args.out} in "
        f"{total:.1f} s "
        f"(embed {pipe.timing['embed_s']:.1f}, denoise {pipe.timing['denoise_s']:.1f} incl. "
        f"compile, decode {pipe.timing['decode_s']:.1f})"
    )
    return 0
