"""The README's first command: sample with the denoiser and write a PNG grid.

Until the end-to-end pipeline lands (data → training → generation → evaluation), this runs
the model core for real: a denoiser (random init, or weights from `--weights`) sampled with
DPM-Solver++(2M) and guidance, jitted as one program, previewed as a latent grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from at1_jax import images, weights
from at1_jax.model import Denoiser
from at1_jax.presets import PRESETS, get_preset
from at1_jax.sampling import SAMPLERS, SamplerConfig, make_sampler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m at1_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tld-tiny", choices=sorted(PRESETS))
    p.add_argument("--weights", help="an at1-jax weights folder (python -m at1_jax.convert)")
    p.add_argument("--num", type=int, default=16, help="images to sample")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--sampler", default="dpmpp2m", choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default="outputs/demo")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if args.weights:
        model = weights.load(args.weights)
    else:
        model = Denoiser(get_preset(args.preset), nnx.Rngs(args.seed))
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    sampler_cfg = SamplerConfig(
        steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed
    )

    def denoise(x, sigma, text, state):
        return nnx.merge(graphdef, state)(x, sigma, text)

    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    run = make_sampler(denoise, sampler_cfg, shape)
    k_text, k_noise = jax.random.split(jax.random.key(args.seed))
    text = jax.random.normal(k_text, (args.num, cfg.text_dim))
    latents = jax.block_until_ready(run(text, k_noise, state))
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    latents = jax.block_until_ready(run(text, k_noise, state))
    t_run = time.perf_counter() - t1
    path = os.path.join(args.out, "latents_grid.png")
    images.save_png(images.grid(images.latents_to_images(latents)), path)
    finite = bool(jnp.isfinite(latents).all())
    print(
        f"sampled {args.num} latents {shape} with {args.sampler}, {args.steps} steps, "
        f"guidance {args.guidance} on {jax.default_backend()}: first call {t_first:.1f} s "
        f"(incl. compile), then {t_run:.2f} s ({args.num / t_run:.1f} img/s); finite={finite}"
    )
    print(f"wrote {path}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
