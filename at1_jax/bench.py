"""Benchmarks that print figures (never asserted in tests).

python -m at1_jax.bench model --presets tld-tiny,at1 --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
from flax import nnx

from at1_jax.diffusion import x0_loss
from at1_jax.model import Denoiser, DenoiserConfig
from at1_jax.presets import PRESETS, get_preset


def analytic_train_flops(cfg: DenoiserConfig) -> float:
    """Matmul FLOPs of one training image (forward ×3), from the architecture alone."""
    T, E, L, H = cfg.num_tokens, cfg.width, cfg.depth, cfg.mlp_mult * cfg.width
    per_block = 2 * T * (3 * E * E + E * E + 2 * H * E + 9 * H)  # qkv, q, MLP, depthwise
    per_block += 2 * 2 * T * T * E  # self-attention scores and values
    per_block += 2 * 2 * T * 2 * E + 2 * 2 * 2 * E * E  # cross-attention, kv of 2 tokens
    P = cfg.patch_dim
    outer = 2 * T * (P * P + P * E + E * P)
    return 3.0 * (L * per_block + outer)


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA counts for a compiled computation (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _batch(cfg: DenoiserConfig, batch: int):
    k = jax.random.split(jax.random.key(0), 3)
    shape = (batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return (
        jax.random.normal(k[0], shape),
        jax.random.uniform(k[1], (batch, 1), minval=0.05, maxval=0.95),
        jax.random.normal(k[2], (batch, cfg.text_dim)),
    )


def bench_model(cfg: DenoiserConfig, batch: int, steps: int, time_it: bool = True) -> dict:
    """Forward+backward of the x0 loss: compile time, step time, images/s, FLOPs/image."""
    model = nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r, x, s, t):
        return x0_loss(nnx.merge(graphdef, p, r)(x, s, t), x)

    grad_fn = jax.jit(jax.value_and_grad(loss))
    inputs = _batch(cfg, batch)
    t0 = time.perf_counter()
    compiled = grad_fn.lower(params, rest, *inputs).compile()
    out = {"compile_s": time.perf_counter() - t0, "flops_per_image": None}
    flops = compiled_flops(compiled)
    out["flops_per_image"] = flops / batch if flops else None
    out["analytic_flops_per_image"] = analytic_train_flops(cfg)
    if not time_it:
        return out
    model = Denoiser(cfg, nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    jax.block_until_ready(compiled(params, rest, *inputs))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        value, grads = compiled(params, rest, *inputs)
    jax.block_until_ready((value, grads))
    step = (time.perf_counter() - t0) / steps
    out.update(step_s=step, images_per_s=batch / step)
    if out["flops_per_image"]:
        out["tflops_per_s"] = out["flops_per_image"] * batch / step / 1e12
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m at1_jax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="forward+backward throughput and FLOPs per preset")
    default = "tld-tiny,at1" if jax.default_backend() == "cpu" else ",".join(PRESETS)
    m.add_argument("--presets", default=default, help=f"comma-separated (default {default})")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    m.add_argument("--depthwise", choices=("auto", "conv", "shift"), default="auto")
    m.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    m.add_argument("--remat", action="store_true")
    m.add_argument("--flops-only", action="store_true", help="compile and count, do not time")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={device.device_kind} x{jax.device_count()}")
    print(f"batch={args.batch} dtype={args.dtype} depthwise={args.depthwise} remat={args.remat}")
    header = f"{'preset':10} {'img/s':>8} {'step s':>8} {'TFLOP/s':>8} {'GFLOP/img':>10} "
    print(header + f"{'analytic':>9} {'compile s':>9}")
    for name in args.presets.split(","):
        cfg = dataclasses.replace(
            get_preset(name),
            dtype=args.dtype,
            depthwise=args.depthwise,
            attention=args.attention,
            remat=args.remat,
        )
        r = bench_model(cfg, args.batch, args.steps, time_it=not args.flops_only)
        gflop = r["flops_per_image"] and r["flops_per_image"] / 1e9
        print(
            f"{name:10} {_fmt(r.get('images_per_s'), '8.2f')} {_fmt(r.get('step_s'), '8.3f')} "
            f"{_fmt(r.get('tflops_per_s'), '8.3f')} {_fmt(gflop, '10.2f')} "
            f"{r['analytic_flops_per_image'] / 1e9:9.2f} {r['compile_s']:9.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
