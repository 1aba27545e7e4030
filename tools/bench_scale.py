"""Multi-process against one process on this CPU: 2 processes × 2 devices vs 1 × 4 devices.

    make bench-scale                    # tld-tiny, then at1; global batch 32, dtype auto
    python tools/bench_scale.py --presets tld-tiny --batch 8 --steps 2 --rounds 1

Both configurations run `python -m at1_jax.bench train` with the same preset, global batch
and (data=2, fsdp=2) mesh over 4 fake CPU devices: once as one process with 4 devices, once
through launch/local.py as 2 processes with 2 devices each, joined by jax.distributed. They
take turns for `--rounds` rounds, the order flipping every round, so that other jobs on the
machine load both alike. The figure, per preset, is the ratio of the median step times;
nothing here is asserted. `tld-tiny` is configs/cpu.py's model, the one launch/local.py
runs on CPU in the docs; `at1` all-reduces 26x its gradient bytes every step. Beside the
times, the CPU time all of a run's processes spent per step (and so how many cores they
kept busy): on one machine, what a second runtime costs shows up there. "grads" is how each
configuration's step summed its gradients (mesh.grad_reduce=auto resolved): one flat
all-reduce across processes, where XLA placed them in one.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from at1_io.help_format import DefaultsHelpFormatter

ROOT = Path(__file__).resolve().parent.parent
DATA, FSDP = 2, 2
CONFIGS = {"1x4": (1, 4), "2x2": (2, 2)}  # name: (processes, devices per process)
TOLERANCE = 0.10
FIGURES = re.compile(r"images/s ([\d.]+) \| step ([\d.]+) s")
CPU = re.compile(r"this process: CPU ([\d.]+) s/step")  # one line from every process
HEADER = re.compile(r"processes=(\d+) devices=(\d+)")
GRADS = re.compile(r" grad_reduce=(\w+)")  # how the step summed gradients: flat or xla
# Set by launch/local.py for its children; inherited ones would make the 1x4 run try to join.
JOB_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class RunFailed(Exception):
    """A benchmark run exited non-zero, timed out or printed no figures."""


def child_env(devices: int) -> dict:
    """This environment (GLIBC_TUNABLES and all) with `devices` fake CPU devices per process."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env


def default_steps(preset: str) -> int:
    """Timed steps per run when --steps is 0: ~2 s of `tld-tiny`, ~12 s of `at1` on 2 cores."""
    return 40 if preset == "tld-tiny" else 5


def command(name: str, preset: str, steps: int, args) -> list[str]:
    """The `bench train` command line of one configuration."""
    bench = [sys.executable, "-m", "at1_jax.bench", "train", "--preset", preset]
    bench += ["--batch", str(args.batch), "--steps", str(steps), "--dtype", args.dtype]
    bench += ["--data", str(DATA), "--fsdp", str(FSDP)]
    processes, devices = CONFIGS[name]
    if processes == 1:
        return bench
    launcher = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", str(processes)]
    return [*launcher, "--devices-per-process", str(devices), "--", *bench]


def run_once(name: str, preset: str, steps: int, args) -> tuple[float, float, str]:
    """One run of a configuration: step time, its processes' CPU time per step, grad_reduce."""
    processes, devices = CONFIGS[name]
    try:
        run = subprocess.run(
            command(name, preset, steps, args),
            cwd=ROOT,
            env=child_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # the launcher merges its children's streams anyway
            text=True,
            errors="replace",
            timeout=args.timeout_s,
        )
        output, code = run.stdout, run.returncode
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        raise RunFailed(name, f"timed out after {args.timeout_s:.0f} s", output or "") from None
    figures = FIGURES.findall(output)
    header = HEADER.findall(output)
    cpu = [float(c) for c in CPU.findall(output)]
    grads = GRADS.findall(output)
    if code != 0:
        raise RunFailed(name, f"exit code {code}", output)
    if len(figures) != 1 or header != [(str(processes), str(processes * devices))]:
        # One figures line from process 0 only, and the run it describes is the one asked for.
        why = f"expected one figures line for processes={processes}, got {header or 'none'}"
        raise RunFailed(name, why, output)
    if len(cpu) != processes:
        raise RunFailed(name, f"expected {processes} CPU lines, got {len(cpu)}", output)
    if len(grads) != 1:
        raise RunFailed(name, f"expected one grad_reduce= in the header, got {grads}", output)
    return float(figures[0][1]), sum(cpu), grads[0]


def report(
    args, preset: str, n_steps: int, steps: dict, cpu: dict, grads: dict, load: tuple
) -> str:
    """The comparison table (with the CPU time all processes spent), the ratio, the verdict."""
    lines = [
        f"preset={preset} batch={args.batch} dtype={args.dtype} steps={n_steps} "
        f"rounds={args.rounds} mesh=data:{DATA},fsdp:{FSDP} load={load[0]:.1f}->{load[1]:.1f}",
        f"  {'config':6} {'processes':>9} {'devices':>7} {'step s min':>10} {'median':>7} "
        f"{'img/s':>8} {'CPU s/step':>10} {'cores':>5} grads",
    ]
    for name, (processes, devices) in CONFIGS.items():
        median, cpu_s = statistics.median(steps[name]), statistics.median(cpu[name])
        lines.append(
            f"  {name:6} {processes:9d} {processes * devices:7d} {min(steps[name]):10.3f} "
            f"{median:7.3f} {args.batch / median:8.2f} {cpu_s:10.3f} {cpu_s / median:5.2f} "
            f"{grads[name]}"
        )
    ratio = statistics.median(steps["2x2"]) / statistics.median(steps["1x4"])
    rounds = [a / b for a, b in zip(steps["2x2"], steps["1x4"], strict=True)]
    lines.append(
        f"  ratio 2x2/1x4 step time: {ratio:.3f}x (median over median; rounds "
        f"{min(rounds):.3f}-{max(rounds):.3f}x)"
    )
    lines.append(f"  within {TOLERANCE:.0%}: {'yes' if abs(ratio - 1) <= TOLERANCE else 'no'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python tools/bench_scale.py", description=__doc__,
        formatter_class=DefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("--presets", "--preset", dest="presets", default="tld-tiny,at1",
                   help="comma-separated; each compared on its own")  # fmt: skip
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=32,
                   help="global batch, both configurations")  # fmt: skip
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 where the CPU has bf16 dot products")  # fmt: skip
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per run, after a warm-up (0: see default_steps)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="runs per configuration, alternating")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per run")
    args = p.parse_args(argv)
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    if args.rounds < 1 or args.batch < 1 or args.steps < 0 or not presets:
        p.error("--rounds and --batch must be >= 1, --steps >= 0, --presets not empty")
    for preset in presets:
        if compare(preset, args.steps or default_steps(preset), args):
            return 1
    return 0


def compare(preset: str, n_steps: int, args) -> int:
    """Alternating rounds of both configurations of one preset, then its report; 1 if one failed."""
    load = os.getloadavg()[0]
    steps = {name: [] for name in CONFIGS}
    cpu = {name: [] for name in CONFIGS}
    grads = {}
    try:
        for i in range(args.rounds):
            order = list(CONFIGS) if i % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                step_s, cpu_s, grads[name] = run_once(name, preset, n_steps, args)
                steps[name].append(step_s)
                cpu[name].append(cpu_s)
                print(f"{preset} round {i + 1}/{args.rounds}: {name} step {step_s:.3f} s",
                      flush=True)  # fmt: skip
    except RunFailed as e:
        name, why, output = e.args
        tail = "\n".join(output.rstrip().splitlines()[-20:])
        cmd = " ".join(command(name, preset, n_steps, args))
        print(f"{name} run failed ({why}): {cmd}", file=sys.stderr)
        print(tail, file=sys.stderr)
        return 1
    load = (load, os.getloadavg()[0])
    print(report(args, preset, n_steps, steps, cpu, grads, load), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
