"""Benchmarks that print figures (never asserted in tests).

python -m at1_jax.bench model --presets tld-tiny,at1 --batch 32
python -m at1_jax.bench sample --presets at1 --batch 16 --steps 15
python launch/local.py --processes 2 --devices-per-process 2 -- \
    python -m at1_jax.bench train --preset at1 --batch 32 --data 2 --fsdp 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from at1_io.help_format import DefaultsHelpFormatter
from at1_jax.model.denoiser import DEPTHWISE, Denoiser, DenoiserConfig
from at1_jax.model.flops import analytic_train_flops, compiled_flops, peak_flops
from at1_jax.model.hardware import resolve_dtype
from at1_jax.model.objective import x0_loss
from at1_jax.model.presets import PRESETS, get_preset
from at1_jax.train.sharding import GRAD_REDUCE

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPE_HELP = "compute dtype; auto: bfloat16 where the hardware has fast bfloat16 dot products"


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


# SDXL's VAE decoder layout (madebyollin/sdxl-vae-fp16-fix has the same shapes).
SDXL_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}


def bench_sample(cfg: DenoiserConfig, batch: int, steps: int, guidance: float = 6.0) -> dict:
    """Generation: seconds per batch of guided DPM++(2M) denoising and of VAE decoding.

    Random weights for both (no real ones on this machine): the timing depends only on shapes.
    """
    import jax.numpy as jnp
    import numpy as np

    from at1_jax.decode.vae import VAEConfig, VAEDecoder
    from at1_jax.generate.pipeline import Denoising
    from at1_jax.model.samplers import SamplerConfig

    denoising = Denoising(Denoiser(cfg, nnx.Rngs(0)), batch)
    sampler = SamplerConfig(steps=steps, guidance=guidance)
    text = np.random.default_rng(0).standard_normal((batch, cfg.text_dim)).astype(np.float32)
    seeds = list(range(batch))
    t0 = time.perf_counter()
    x0 = denoising.latents(text, seeds, sampler)
    out = {"denoise_first_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    x0 = denoising.latents(text, seeds, sampler)
    out["denoise_s"] = time.perf_counter() - t0
    vae = VAEDecoder(VAEConfig.from_dict(SDXL_VAE), rngs=nnx.Rngs(0))
    z = jnp.asarray(x0 * 8.0)  # the references' latent scale
    t0 = time.perf_counter()
    jax.block_until_ready(vae.decode_to_images(z, uint8=True))
    out["decode_first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs = jax.block_until_ready(vae.decode_to_images(z, uint8=True))
    out["decode_s"] = time.perf_counter() - t0
    out["image_shape"] = tuple(imgs.shape[1:])
    out["images_per_s"] = batch / (out["denoise_s"] + out["decode_s"])
    return out


def _main_sample(args) -> int:
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}")
    print(f"batch={args.batch} steps={args.steps} guidance={args.guidance} (2x batch per call)")
    print("decoder: SDXL-layout AutoencoderKL decoder with random weights (none available)")
    head = f"{'preset':10} {'img/s':>7} {'denoise s':>9} {'decode s':>9} {'denoise %':>9}"
    print(head + f" {'compile+1st dn':>14} {'compile+1st dec':>15} image")
    for name in args.presets.split(","):
        cfg = dataclasses.replace(get_preset(name), dtype=args.dtype)
        r = bench_sample(cfg, args.batch, args.steps, args.guidance)
        share = 100 * r["denoise_s"] / (r["denoise_s"] + r["decode_s"])
        print(
            f"{name:10} {r['images_per_s']:7.3f} {r['denoise_s']:9.2f} {r['decode_s']:9.2f} "
            f"{share:9.0f} {r['denoise_first_s']:14.1f} {r['decode_first_s']:15.1f} "
            f"{r['image_shape']}",
            flush=True,
        )
    return 0


def wait_turn(turn_dir: str, window: int, poll_s: float = 0.005) -> None:
    """Block until `turn_dir`/go-`window` exists (process 0 first says it waits for it)."""
    if jax.process_index() == 0:
        print(f"waiting for window {window}", flush=True)
    go = Path(turn_dir) / f"go-{window}"
    while not go.exists():
        time.sleep(poll_s)  # ~200 stat calls a second: no measurable CPU


def bench_train(
    cfg, steps: int, profile_dir: str | None = None, windows: int = 1, turn_dir: str | None = None
) -> dict:
    """The real sharded train step on synthetic batches: time, FLOPs, MFU, memory, CPU time."""
    # With profile_dir, `steps` more steps run under jax.profiler.trace (written there) and
    # "profile" holds the step's kernel time by kind. The steps are timed in `windows`
    # windows of `steps` each; with turn_dir, each window waits for its go file (wait_turn),
    # takes one untimed step, and every process prints its figures as soon as it ends.
    import resource

    import numpy as np

    from at1_jax.train import host_memory, sharding
    from at1_jax.train import step as train_step

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    spec = train_step.state_spec(cfg, tx, mesh)
    state = train_step.init_state(cfg, tx, spec)
    m, rng = cfg.model, np.random.default_rng(0)
    n = cfg.data.batch_size // jax.process_count()
    shape = (n, m.latent_channels, m.latent_size, m.latent_size)
    local = {
        "latent": rng.standard_normal(shape).astype(np.float16),
        "latent_std": np.full(shape, 0.1, np.float16),
        "text": rng.standard_normal((n, m.text_dim)).astype(np.float16),
    }
    batch = train_step.global_batch(local, spec, cfg.data.batch_size)
    t0 = time.perf_counter()
    jitted = train_step.make_train_step(cfg, tx, spec, 1.0)
    grad_reduce = train_step.grad_reduce(cfg, spec)
    step = host_memory.compile_step(jitted, spec.abstract, batch)  # as the trainer compiles it
    per_device = compiled_flops(step)
    out = {
        "compile_s": time.perf_counter() - t0,
        "grad_reduce": grad_reduce,
        # MFU counts model FLOPs (fwd+bwd matmuls), as is usual; the hardware count below
        # also includes elementwise work and anything replicated across devices.
        "model_flops": analytic_train_flops(cfg.model) * cfg.data.batch_size,
        "hardware_flops": per_device * jax.device_count() if per_device else None,
    }
    memory = step.memory_analysis()
    # XLA allocates these afresh for every execution (on CPU: mapped and page-faulted in).
    out["temp_gib"] = memory.temp_size_in_bytes / 2**30 if memory else None
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    out["windows"] = []  # (step s, this process's CPU s per step) of each window
    for window in range(windows):
        if turn_dir:
            wait_turn(turn_dir, window)
            # Right after another run's turn, steps ran slower (at1's 3-step windows at
            # 3.27-3.65 s a step, 2.44-2.61 s otherwise): time steady ones, as training runs.
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        # All of this process's threads: compute, dispatch, collectives, the kernel's share.
        figures = ((time.perf_counter() - t0) / steps, (_cpu_seconds() - cpu0) / steps)
        out["windows"].append(figures)
        if turn_dir:
            print(f"window {window}: step {figures[0]:.4f} s | CPU {figures[1]:.4f} s/step",
                  flush=True)  # fmt: skip
    dt = sum(w[0] for w in out["windows"]) / windows
    out["cpu_s_per_step"] = sum(w[1] for w in out["windows"]) / windows
    out.update(step_s=dt, images_per_s=cfg.data.batch_size / dt)
    out["tflops_per_s"] = out["model_flops"] / dt / 1e12
    peak = peak_flops(jax.devices()[0])
    out["mfu"] = out["model_flops"] / dt / (peak * jax.device_count()) if peak else None
    stats = jax.local_devices()[0].memory_stats() or {}
    out["peak_device_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30 or None
    out["peak_host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if profile_dir:
        from at1_jax.bench import trace_summary

        if jax.process_count() > 1:  # one trace per process: they would share a file name
            profile_dir = f"{profile_dir}/process{jax.process_index()}"
        out["profile_dir"] = profile_dir
        with jax.profiler.trace(profile_dir):
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        out["profile"] = trace_summary.summarize(profile_dir, step.as_text(), steps)
    return out


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def check_train_setup(cfg) -> None:
    """The mesh fits the devices and the batch splits over it; ConfigError says what to pass."""
    from at1_jax.train import config, sharding

    config.validate(cfg)
    m = cfg.mesh
    try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as e:
        raise config.ConfigError(
            f"--data {m.data} --fsdp {m.fsdp} --tensor {m.tensor}: {e}. Choose sizes whose "
            f"product divides the {jax.device_count()} {jax.default_backend()} device(s); on "
            "CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N fake devices"
        ) from None
    dp = sharding.data_parallel_size(mesh, cfg.mesh.rules)
    if cfg.data.batch_size % (dp * cfg.optim.grad_accum):
        raise config.ConfigError(
            f"--batch {cfg.data.batch_size} must be a multiple of the data-parallel size {dp} "
            f"× --grad-accum {cfg.optim.grad_accum}"
        )
    if cfg.data.batch_size % jax.process_count():
        raise config.ConfigError(
            f"--batch {cfg.data.batch_size} must be a multiple of the {jax.process_count()} "
            "processes (each feeds an equal share)"
        )


def _main_train(args) -> int:
    from at1_jax.train import distributed
    from at1_jax.train.config import (
        ConfigError,
        DataConfig,
        DistributedConfig,
        MeshConfig,
        OptimConfig,
        TrainConfig,
    )

    try:
        # Joins the processes that launch/local.py (or a scheduler) started; a no-op alone.
        distributed.initialize(DistributedConfig())
        model = dataclasses.replace(
            get_preset(args.preset), dtype=args.dtype, remat=args.remat, depthwise=args.depthwise
        )
        cfg = TrainConfig(
            steps=1000,
            model=model,
            data=DataConfig(path="synthetic", batch_size=args.batch),
            optim=OptimConfig(grad_accum=args.grad_accum, clip_norm=1.0),
            mesh=MeshConfig(
                data=args.data, fsdp=args.fsdp, tensor=args.tensor, grad_reduce=args.grad_reduce
            ),
        )
        check_train_setup(cfg)
        if args.windows < 1 or args.steps < 1:
            raise ValueError(f"--windows {args.windows} and --steps {args.steps} must be >= 1")
        r = bench_train(cfg, args.steps, args.profile, args.windows, args.turn_dir)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    temp = _fmt(r["temp_gib"] and r["temp_gib"] * 1024, ".1f")
    cpu_line = (
        f"this process: CPU {r['cpu_s_per_step']:.3f} s/step "
        f"({r['cpu_s_per_step'] / r['step_s']:.2f} cores busy) | "
        f"XLA temporaries {temp} MiB per device, allocated every step"
    )
    if jax.process_index() != 0:  # one report per run: the step is collective, so is its time
        print(cpu_line)  # but every process's CPU time: together they are the run's
        return 0
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} x{jax.device_count()} "
        f"processes={jax.process_count()} devices={jax.device_count()}"
    )
    print(
        f"preset={args.preset} batch={args.batch} dtype={resolve_dtype(args.dtype)} "
        f"remat={args.remat} "
        f"mesh=data:{args.data},fsdp:{args.fsdp},tensor:{args.tensor} accum={args.grad_accum} "
        f"grad_reduce={r['grad_reduce']}"
    )
    print(
        f"images/s {r['images_per_s']:.2f} | step {r['step_s']:.3f} s | "
        f"model TFLOP/s {_fmt(r.get('tflops_per_s'), '.3f')} | MFU {_fmt(r.get('mfu'), '.1%')} | "
        f"peak device mem {_fmt(r['peak_device_gib'], '.2f')} GiB | "
        f"peak host RSS {r['peak_host_gib']:.2f} GiB | compile {r['compile_s']:.1f} s"
    )
    print(cpu_line)
    if "profile" in r:
        from at1_jax.bench.trace_summary import format_rows

        print(f"trace: {r['profile_dir']} ({args.steps} steps, this process)")
        print(format_rows(r["profile"]))
    return 0


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter, prog="python -m at1_jax.bench", description=__doc__
    )
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser(
        "model",
        formatter_class=DefaultsHelpFormatter,
        help="forward+backward throughput and FLOPs per preset",
    )
    # Resolved after parsing: asking for the backend here would start JAX before `train`
    # can join the other processes (jax.distributed must come first).
    m.add_argument(
        "--presets", help="comma-separated (default: tld-tiny,at1 on CPU, every preset elsewhere)"
    )
    m.add_argument("--batch-size", "--batch", dest="batch", type=int, default=32)
    m.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    m.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    m.add_argument("--depthwise", choices=DEPTHWISE, default="auto")
    m.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    m.add_argument("--remat", action="store_true")
    m.add_argument("--flops-only", action="store_true", help="compile and count, do not time")
    s = sub.add_parser(
        "sample",
        formatter_class=DefaultsHelpFormatter,
        help="generation images/s, split into denoising and decoding",
    )
    s.add_argument("--presets", default="at1")
    s.add_argument("--batch-size", "--batch", dest="batch", type=int, default=16)
    s.add_argument("--steps", type=int, default=15)
    s.add_argument("--guidance", type=float, default=6.0)
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    t = sub.add_parser(
        "train",
        formatter_class=DefaultsHelpFormatter,
        help="the sharded train step: img/s, TFLOP/s, MFU, memory",
    )
    t.add_argument("--preset", default="at1")
    t.add_argument(
        "--batch-size", "--batch", dest="batch", type=int, default=32, help="global batch"
    )
    t.add_argument("--steps", type=int, default=5, help="timed steps per window")
    t.add_argument("--windows", type=int, default=1, help="timed windows; figures: their mean")
    t.add_argument(
        "--turn-dir",
        metavar="DIR",
        help="before timed window i, wait until DIR/go-i exists, and print each window's "
        "figures: how tools/bench_scale.py interleaves two runs",
    )
    t.add_argument("--data", type=int, default=-1, help="mesh data axis (-1: the rest)")
    t.add_argument("--fsdp", type=int, default=1)
    t.add_argument("--tensor", type=int, default=1)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument(
        "--grad-reduce",
        choices=GRAD_REDUCE,
        default="auto",
        help="gradients summed as XLA places them or as one flat buffer (mesh.grad_reduce)",
    )
    t.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    t.add_argument("--depthwise", choices=DEPTHWISE, default="auto")
    t.add_argument("--remat", action="store_true")
    t.add_argument(
        "--profile",
        metavar="DIR",
        help="also trace --steps more steps with jax.profiler into DIR (TensorBoard/XProf "
        "can open it) and print the step's kernel time by kind",
    )
    args = parser.parse_args(argv)
    if args.what == "sample":
        return _main_sample(args)
    if args.what == "train":
        return _main_train(args)

    if args.presets is None:
        args.presets = "tld-tiny,at1" if jax.default_backend() == "cpu" else ",".join(PRESETS)
    device = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={device.device_kind} x{jax.device_count()}")
    dtype = resolve_dtype(args.dtype)
    print(f"batch={args.batch} dtype={dtype} depthwise={args.depthwise} remat={args.remat}")
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
