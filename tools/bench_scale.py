"""Multi-process against one process on this CPU: 2 processes × 2 devices vs 1 × 4 devices.

    make bench-scale                    # tld-tiny, then at1; global batch 32, dtype auto
    python tools/bench_scale.py --presets tld-tiny --batch 8 --steps 2 --rounds 1

Both configurations run `python -m at1_jax.bench train` with the same preset, global batch
and (data=2, fsdp=2) mesh over 4 fake CPU devices: once as one process with 4 devices, once
through launch/local.py as 2 processes with 2 devices each, joined by jax.distributed. Both
start at once and compile side by side; then they take turns timing `--steps` steps each
(a window) for `--rounds` rounds, the order flipping every round, while the other waits
idle for its turn (`bench train --turn-dir`). Windows a few seconds apart meet the same
machine: this shared VM's speed drifts by ±10% over minutes, which separate runs, one
after the other, took for a difference between the configurations. The figure, per
preset, is the ratio of the median window step times;
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
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
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
WAITING = re.compile(r"waiting for window (\d+)$")  # process 0, before each timed window
WINDOW = re.compile(r"window (\d+): step ([\d.]+) s \| CPU ([\d.]+) s/step$")  # every process
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
    """Timed steps per window when --steps is 0: ~2 s of `tld-tiny`, ~10 s of `at1` on 2 cores."""
    return 40 if preset == "tld-tiny" else 4


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


class Run:
    """One configuration's `bench train`, started once and then timed window by window."""

    def __init__(self, name: str, preset: str, steps: int, args, turn_dir: Path):
        self.name, self.turn_dir, self.output = name, turn_dir, []
        self.processes, self.devices = CONFIGS[name]  # devices per process
        turn_dir.mkdir()
        cmd = command(name, preset, steps, args)
        cmd += ["--windows", str(args.rounds), "--turn-dir", str(turn_dir)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(self.devices), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # the launcher merges its children's streams anyway
            text=True, errors="replace",
            start_new_session=True,  # one process group: stop() reaches the launcher's children
        )  # fmt: skip
        self.cond = threading.Condition()  # guards what the reader has seen:
        self.waiting: set[int] = set()  # windows process 0 has said it waits for
        self.windows: dict[int, list[tuple[float, float]]] = {}  # (step s, CPU s) per process
        self.ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.output.append(line)
                if m := WAITING.search(line):
                    self.waiting.add(int(m[1]))
                elif m := WINDOW.search(line):
                    self.windows.setdefault(int(m[1]), []).append((float(m[2]), float(m[3])))
                self.cond.notify_all()
        with self.cond:
            self.ended = True  # end of output: the run has exited
            self.cond.notify_all()

    def fail(self, why: str) -> RunFailed:
        with self.cond:
            return RunFailed(self.name, why, "".join(self.output))

    def wait_for(self, seen, what: str, timeout_s: float) -> None:
        """Until `seen()` holds for the output so far; a failure if the run exits or stalls."""
        with self.cond:
            if self.cond.wait_for(lambda: seen() or self.ended, timeout_s) and seen():
                return
        if not self.ended:
            raise self.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        raise self.fail(f"exit code {self.proc.wait()} before {what}")

    def ready(self, timeout_s: float) -> None:
        """Until the run has compiled, warmed up and waits for window 0."""
        self.wait_for(lambda: 0 in self.waiting, "window 0", timeout_s)

    def window(self, i: int, timeout_s: float) -> tuple[float, float]:
        """Run timed window i alone: (step s, all processes' CPU s per step)."""
        (self.turn_dir / f"go-{i}").touch()
        done = lambda: len(self.windows.get(i, ())) == self.processes  # noqa: E731
        self.wait_for(done, f"the figures of window {i}", timeout_s)
        # The step is collective: every process times the same steps; the slowest is the run's.
        return max(w[0] for w in self.windows[i]), sum(w[1] for w in self.windows[i])

    def idle(self, next_window: int, last: bool, timeout_s: float) -> None:
        """Until this run waits for its next window or, after its last, has exited."""
        if not last:
            self.wait_for(lambda: next_window in self.waiting, f"window {next_window}", timeout_s)
            return
        self.wait_for(lambda: self.ended, "its exit", timeout_s)
        if code := self.proc.wait():
            raise self.fail(f"exit code {code}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def summary(run: Run) -> str:
    """How the finished run summed its gradients, after checking it is the run asked for."""
    output = "".join(run.output)
    figures, header = FIGURES.findall(output), HEADER.findall(output)
    cpu, grads = CPU.findall(output), GRADS.findall(output)
    processes = run.processes
    if len(figures) != 1 or header != [(str(processes), str(processes * run.devices))]:
        # One figures line from process 0 only, and the run it describes is the one asked for.
        why = f"expected one figures line for processes={processes}, got {header or 'none'}"
        raise run.fail(why)
    if len(cpu) != processes:
        raise run.fail(f"expected {processes} CPU lines, got {len(cpu)}")
    if len(grads) != 1:
        raise run.fail(f"expected one grad_reduce= in the header, got {grads}")
    return grads[0]


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
                   help="timed steps per window (0: see default_steps)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=6,
                   help="timed windows per configuration, taking turns")  # fmt: skip
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="for the compile and warm-up, and for each window")  # fmt: skip
    args = p.parse_args(argv)
    # As an exit, so that compare() stops the runs it started (in sessions of their own).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    if args.rounds < 1 or args.batch < 1 or args.steps < 0 or not presets:
        p.error("--rounds and --batch must be >= 1, --steps >= 0, --presets not empty")
    for preset in presets:
        if compare(preset, args.steps or default_steps(preset), args):
            return 1
    return 0


def compare(preset: str, n_steps: int, args) -> int:
    """Both configurations of one preset, windows interleaved, then the report; 1 if one failed."""
    load = os.getloadavg()[0]
    steps = {name: [] for name in CONFIGS}
    cpu = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        runs = {}
        try:
            for name in CONFIGS:
                runs[name] = Run(name, preset, n_steps, args, Path(tmp) / name)
            for run in runs.values():  # both compiled and warmed up, neither timing yet
                run.ready(args.timeout_s)
            for i in range(args.rounds):
                order = list(CONFIGS) if i % 2 == 0 else list(reversed(CONFIGS))
                for name in order:
                    step_s, cpu_s = runs[name].window(i, args.timeout_s)
                    runs[name].idle(i + 1, i + 1 == args.rounds, args.timeout_s)
                    steps[name].append(step_s)
                    cpu[name].append(cpu_s)
                    print(f"{preset} round {i + 1}/{args.rounds}: {name} step {step_s:.3f} s",
                          flush=True)  # fmt: skip
            grads = {name: summary(run) for name, run in runs.items()}
        except RunFailed as e:
            name, why, output = e.args
            tail = "\n".join(output.rstrip().splitlines()[-20:])
            cmd = " ".join(command(name, preset, n_steps, args))
            print(f"{name} run failed ({why}): {cmd}", file=sys.stderr)
            print(tail, file=sys.stderr)
            return 1
        finally:
            for run in runs.values():
                run.stop()
    load = (load, os.getloadavg()[0])
    print(report(args, preset, n_steps, steps, cpu, grads, load), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
