"""Side by side on this CPU: at1_jax's train step against the PyTorch reference step.

    make bench-compare                                   # at1 and tld-tiny, batch 32
    python tools/bench_compare.py --presets at1 --batch 32 --rounds 5 --round-s 15

Each side runs in its own worker process (so peak RSS is per side), built once and
warmed up, then the two take turns for `--rounds` rounds of about `--round-s` seconds
each, the order flipping every round, so that other jobs on the machine load both alike.
Each round starts with `--rewarm` untimed steps on each side (memory idle during the other
side's round can have been paged out). The JAX side is the project's real sharded step
(at1_jax.train.step: posterior sample, noise, fwd+bwd, clipping, Adam, EMA, non-finite
guard), run as the trainer runs it: each step is dispatched before the previous step's
loss is read (PyTorch's eager step is synchronous: it has nothing to overlap). The PyTorch
side is the tests' reference model (tests/torch_reference.py) with the same preset, batch,
objective, clipping, Adam and EMA, fp32 eager. The figure is the ratio; nothing here is
asserted. Each side's CPU time over its wall time while stepping ("cores") says how much of
the machine it kept busy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "BENCH "  # worker lines the parent reads; everything else is passed through
SIDES = ("at1_jax", "torch")
# torch's first few steps run 10-100x slower (lazy kernel and allocator set-up), JAX's first
# compiles: neither belongs to the rounds.
WARM_UP_STEPS, CALIBRATION_STEPS = 3, 2


def _emit(obj: dict) -> None:
    print(TAG + json.dumps(obj), flush=True)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _synthetic_batch(model: dict, batch: int) -> dict:
    """The batch both sides train on: fp16 latents, posterior std 0.1, fp16 text vectors."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (batch, model["latent_channels"], model["latent_size"], model["latent_size"])
    return {
        "latent": rng.standard_normal(shape).astype(np.float16),
        "latent_std": np.full(shape, 0.1, np.float16),
        "text": rng.standard_normal((batch, model["text_dim"])).astype(np.float16),
    }


def _run(start, n: int) -> float | None:
    """n steps as the trainer runs them; returns the last loss.

    `start()` dispatches one step and returns a function that waits for it and gives its
    loss. Like at1_jax.train's loop, the next step is dispatched before the previous one's
    loss is read, so the host's dispatch overlaps the device's work (PyTorch's eager step
    has finished when `start` returns: there, nothing overlaps).
    """
    pending, loss = None, None
    for _ in range(n):
        finish = start()
        if pending is not None:
            loss = pending()
        pending = finish
    return pending() if pending is not None else loss


def _warm_up(start) -> float:
    """Warm-up steps (compilation, torch's lazy kernel set-up), then calibration steps.

    Returns when the calibration started; the caller times from there.
    """
    _run(start, WARM_UP_STEPS)
    first = time.perf_counter()
    _run(start, CALIBRATION_STEPS)
    return first


def _serve(start) -> None:
    """Worker loop: 'N W' on stdin runs W untimed, then N timed steps; 'quit' ends."""
    for line in sys.stdin:
        command = line.split()
        if command == ["quit"]:
            _emit({"peak_rss_gib": _peak_rss_gib()})
            return
        _run(start, int(command[1]))
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        loss = _run(start, int(command[0]))
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        _emit({"steps": int(command[0]), "seconds": seconds, "cpu_s": cpu, "loss": loss})


def jax_worker(spec: dict) -> None:
    """The project's train step, as `python -m at1_jax.bench train` builds it."""
    import dataclasses

    import jax

    from at1_jax.bench.benchmarks import check_train_setup
    from at1_jax.model.denoiser import DenoiserConfig
    from at1_jax.model.hardware import auto_dtype_reason
    from at1_jax.model.objective import ObjectiveConfig
    from at1_jax.train import host_memory, sharding
    from at1_jax.train import step as train_step
    from at1_jax.train.config import DataConfig, MeshConfig, OptimConfig, TrainConfig

    t0 = time.perf_counter()
    model = DenoiserConfig(**spec["model"])
    dtype, why = auto_dtype_reason() if spec["dtype"] == "auto" else (spec["dtype"], "")
    cfg = TrainConfig(
        steps=1000,
        model=dataclasses.replace(model, dtype=dtype, depthwise=spec["depthwise"]),
        objective=ObjectiveConfig(**spec["objective"]),
        data=DataConfig(path="synthetic", batch_size=spec["batch"]),
        optim=OptimConfig(**spec["optim"]),
        mesh=MeshConfig(data=-1, fsdp=spec["fsdp"]),
    )
    check_train_setup(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    state_spec = train_step.state_spec(cfg, tx, mesh)
    state = train_step.init_state(cfg, tx, state_spec)
    batch = train_step.global_batch(
        _synthetic_batch(spec["model"], spec["batch"]), state_spec, spec["batch"]
    )
    jitted = train_step.make_train_step(cfg, tx, state_spec, 1.0)
    if spec["xla_options"]:
        options = {k: _option_value(v) for k, v in spec["xla_options"].items()}
        step = jitted.lower(state_spec.abstract, batch).compile(compiler_options=options)
    else:  # as the trainer compiles it
        step = host_memory.compile_step(jitted, state_spec.abstract, batch)
    box = {"state": state}

    def start():
        box["state"], metrics = step(box["state"], batch)
        return lambda: float(metrics["loss"])

    first = _warm_up(start)
    _emit(
        {
            "ready": True,
            "setup_s": first - t0,
            "step_s": (time.perf_counter() - first) / CALIBRATION_STEPS,
            "what": f"jax {jax.__version__}, {jax.device_count()} CPU device(s), "
            f"mesh data:{mesh.shape['data']} fsdp:{mesh.shape['fsdp']}, "
            f"compute {dtype}{f' (auto: {why})' if why else ''}, depthwise {spec['depthwise']}"
            + "".join(f", {k}={v}" for k, v in spec["xla_options"].items()),
        }
    )
    _serve(start)


def _option_value(text: str):
    """An XLA option's value from the command line: true/false, an int, or the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def torch_worker(spec: dict) -> None:
    """The reference model (tests/torch_reference.py) in the reference's eager fp32 step."""
    import torch
    from torch.nn import functional as F

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_reference import Denoiser

    t0 = time.perf_counter()
    torch.manual_seed(0)
    m, o, obj = spec["model"], spec["optim"], spec["objective"]
    model = Denoiser(
        c=m["latent_channels"],
        size=m["latent_size"],
        p=m["patch_size"],
        e=m["width"],
        depth=m["depth"],
        noise_dims=m["noise_embed_dims"],
        text_dim=m["text_dim"],
        mult=m["mlp_mult"],
        cross_heads=m["cross_heads"],
        block=m["block"],
    )
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
    beta = torch.distributions.Beta(obj["beta_a"], obj["beta_b"])
    B, batch = spec["batch"], _synthetic_batch(m, spec["batch"])
    latent, latent_std, text = (
        torch.from_numpy(batch[k]).float() for k in ("latent", "latent_std", "text")
    )

    def start():
        x = latent + latent_std * torch.randn_like(latent)  # the VAE posterior, re-sampled
        sigma = beta.sample((B, 1)).clamp(1e-5, 1 - 1e-5)
        x_noisy = sigma.view(B, 1, 1, 1) * torch.randn_like(x) + (1 - sigma.view(B, 1, 1, 1)) * x
        keep = (torch.rand(B, 1) >= obj["cfg_drop"]).float()
        loss = F.mse_loss(model(x_noisy, sigma, text * keep), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o["clip_norm"])
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - o["ema_decay"])
        loss = loss.item()
        return lambda: loss

    first = _warm_up(start)
    _emit(
        {
            "ready": True,
            "setup_s": first - t0,
            "step_s": (time.perf_counter() - first) / CALIBRATION_STEPS,
            "what": f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 eager",
        }
    )
    _serve(start)


class Worker:
    """One side's process; talks the line protocol of `_serve`."""

    def __init__(self, side: str, spec: dict, devices: int, malloc: str):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_pythonpath())
        env.pop("GLIBC_TUNABLES", None)
        if malloc:
            env["GLIBC_TUNABLES"] = malloc
        self.malloc = malloc or "glibc defaults"
        flags = [
            f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
        ]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        cmd = [sys.executable, __file__, "--worker", side, "--spec", json.dumps(spec)]
        self.side = side
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
            sys.stderr.write(line)
        code = self.proc.wait()
        why = " (SIGKILL: out of memory?)" if code == -9 else " (its stderr is above)"
        raise SystemExit(f"error: the {self.side} worker exited with status {code}{why}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> float:
        rss = self.ask("quit")["peak_rss_gib"]
        self.proc.wait()
        return rss


def _pythonpath() -> str:
    parts = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def _spec(preset: str, args) -> dict:
    import dataclasses

    from at1_jax.model.objective import AT1_OBJECTIVE
    from at1_jax.model.presets import get_preset
    from at1_jax.train.config import OptimConfig

    model = get_preset(preset).architecture()
    return {
        "model": dataclasses.asdict(model),
        "objective": dataclasses.asdict(AT1_OBJECTIVE),
        "optim": dataclasses.asdict(OptimConfig(clip_norm=1.0)),
        "batch": args.batch,
        "dtype": args.dtype,
        "depthwise": args.depthwise,
        "fsdp": args.fsdp,
        "xla_options": dict(o.split("=", 1) for o in args.xla_option),
    }


def compare(preset: str, args) -> dict:
    """Alternating rounds of both sides; returns per-side img/s per round, RSS and the ratio."""
    spec = _spec(preset, args)
    malloc = {"at1_jax": args.jax_malloc, "torch": args.torch_malloc}
    # Built one after the other.
    workers = {s: Worker(s, spec, args.devices, malloc[s]) for s in SIDES}
    steps = {s: max(1, round(args.round_s / w.info["step_s"])) for s, w in workers.items()}
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    cores: dict[str, list[float]] = {s: [] for s in SIDES}  # CPU time over wall time
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            out = workers[side].ask(f"{steps[side]} {args.rewarm}")
            rates[side].append(args.batch * out["steps"] / out["seconds"])
            cores[side].append(out["cpu_s"] / out["seconds"])
            losses[side] = out["loss"]
    rss = {s: w.close() for s, w in workers.items()}
    pair = [j / t for j, t in zip(rates["at1_jax"], rates["torch"], strict=True)]
    return {
        "preset": preset,
        "batch": args.batch,
        "what": {s: f"{w.info['what']}, malloc: {w.malloc}" for s, w in workers.items()},
        "setup_s": {s: w.info["setup_s"] for s, w in workers.items()},
        "steps_per_round": steps,
        "img_per_s": rates,
        "cores_busy": cores,
        "last_loss": losses,
        "peak_rss_gib": rss,
        "ratio_median": statistics.median(rates["at1_jax"]) / statistics.median(rates["torch"]),
        "ratio_per_round": pair,
        "rss_ratio": rss["at1_jax"] / rss["torch"],
    }


def report(r: dict) -> str:
    """The printed table of one preset."""
    lines = [
        f"preset={r['preset']} batch={r['batch']} rounds={len(r['ratio_per_round'])} "
        f"load={os.getloadavg()[0]:.1f}",
    ]
    lines += [f"  {s}: {r['what'][s]}" for s in SIDES]
    lines.append(
        f"  {'side':8} {'img/s min':>9} {'median':>7} {'max':>7} {'peak RSS GiB':>12} "
        f"{'steps/round':>11} {'setup s':>7} {'last loss':>9} {'cores':>5}"
    )
    for s in SIDES:
        v = r["img_per_s"][s]
        lines.append(
            f"  {s:8} {min(v):9.2f} {statistics.median(v):7.2f} {max(v):7.2f} "
            f"{r['peak_rss_gib'][s]:12.2f} {r['steps_per_round'][s]:11d} "
            f"{r['setup_s'][s]:7.1f} {r['last_loss'][s]:9.4f} "
            f"{statistics.median(r['cores_busy'][s]):5.2f}"
        )
    pair = r["ratio_per_round"]
    lines.append(
        f"  ratio at1_jax/torch: img/s {r['ratio_median']:.2f}x (median over median; rounds "
        f"{min(pair):.2f}-{max(pair):.2f}x), peak RSS {r['rss_ratio']:.2f}x"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="at1,tld-tiny", help="comma-separated preset names")
    p.add_argument("--batch", type=int, default=32, help="global batch, both sides")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side, alternating")
    p.add_argument("--round-s", type=float, default=15.0, help="about this long per round")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="JAX compute dtype (parameters, loss, optimiser stay fp32); auto, the "
                        "shipped configs' choice, is bfloat16 on CPUs with bfloat16 dot "
                        "products (AVX512_BF16, AMX), else float32")  # fmt: skip
    p.add_argument("--jax-malloc", default=os.environ.get("GLIBC_TUNABLES", ""),
                   help="GLIBC_TUNABLES of the JAX worker (default: this environment's, which "
                        "the Makefile sets)")  # fmt: skip
    p.add_argument("--torch-malloc", default="",
                   help="GLIBC_TUNABLES of the PyTorch worker (default: none, glibc's malloc "
                        "as the reference runs; hugetlb made its step slower here)")  # fmt: skip
    p.add_argument("--rewarm", type=int, default=1,
                   help="untimed steps at the start of each round: memory a side left idle "
                        "while the other ran may have been paged out (this VM's DAMON pageout "
                        "made the first JAX step after 20 s idle 3.5x slower)")  # fmt: skip
    p.add_argument("--depthwise", choices=("auto", "conv", "shift"), default="auto")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices for the JAX side")
    p.add_argument("--fsdp", type=int, default=1, help="fsdp mesh axis (data takes the rest)")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="XLA compiler option for the JAX step (repeatable), e.g. "
                   "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")  # fmt: skip
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        (jax_worker if args.worker == "at1_jax" else torch_worker)(json.loads(args.spec))
        return 0
    if args.rounds < 1 or args.batch < 1 or args.round_s <= 0 or args.rewarm < 0:
        p.error("--rounds and --batch must be >= 1, --round-s > 0 and --rewarm >= 0")
    bad = [o for o in args.xla_option if "=" not in o]
    if bad:
        p.error(f"--xla-option takes NAME=VALUE, got {bad[0]!r}")
    from at1_jax.model.presets import get_preset

    try:
        presets = [get_preset(name) and name for name in args.presets.split(",")]
    except ValueError as e:
        p.error(str(e))
    results = []
    for preset in presets:
        results.append(compare(preset, args))
        print(report(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
