#!/usr/bin/env python3
"""Run training or data-prep encoding as a gang of Ray actors, one per GPU (or CPU) worker.

    # one JAX process per GPU; coordinator = worker 0's IP and a fixed port
    python launch/ray/launcher.py --address auto train --workers 8 -- \
        python -m at1_jax.train --config configs/at1.py
    # one data_prep.encode worker per GPU (--num-workers/--worker-index appended)
    python launch/ray/launcher.py --address auto encode --workers 8 -- \
        python -m data_prep.encode s3://raw/tars s3://data/ds --caption all

Each actor runs the command as a child process (its own main thread, so the trainer's
SIGTERM → checkpoint → exit path works) with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set. Ray Train's JaxTrainer is not used: it runs the loop in a thread and
picks a random coordinator port, while Akash exposes only fixed ports.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

DEFAULT_PORT = 8476  # jax.distributed coordinator; must be open between nodes (Akash: exposed)


def _die_with_parent():
    """SIGKILL the command when its actor dies (ray.kill, node loss): no orphaned JAX job."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@ray.remote(max_concurrency=2)  # run() blocks; stop() must still get through
class Worker:
    """One worker slot: runs one command as a child process and relays its output."""

    def __init__(self):
        self.proc = None

    def ip(self) -> str:
        return ray.util.get_node_ip_address()

    def run(self, cmd: list[str], env: dict, cwd: str | None, prefix: str) -> int:
        full = {**os.environ, **env}
        if cwd and not os.path.isdir(cwd):
            cwd = None  # the image may keep the code elsewhere; the command must then be absolute
        self.proc = subprocess.Popen(
            cmd,
            env=full,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        for line in iter(self.proc.stdout.readline, b""):
            sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
            sys.stdout.flush()
        return self.proc.wait()

    def stop(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def cpu_env(devices: int) -> dict:
    """Fake CPU devices for a worker (tests, or CPU-only clusters)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        "XLA_FLAGS": " ".join(flags),
    }


def forwarded_env(items: list[str]) -> dict:
    """--env NAME (copied from the driver) or --env NAME=VALUE."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise SystemExit(f"--env {name}: not set in the driver's environment")
            value = os.environ[name]
        env[name] = value
    return env


class Gang:
    """N actors in one placement group (all scheduled or none)."""

    def __init__(self, args):
        bundle = {"CPU": args.cpus_per_worker}
        if args.gpus_per_worker:
            bundle["GPU"] = args.gpus_per_worker
        need, have = args.gpus_per_worker * args.workers, ray.cluster_resources().get("GPU", 0)
        if need > have:  # an autoscaler may still add them: say why we wait, do not give up
            print(
                f"[launcher] the gang needs {need:g} GPUs, the cluster has {have:g} now: "
                f"waiting up to {args.schedule_timeout:.0f} s (--cpu-devices N runs on CPUs)"
            )
        self.pg = placement_group([bundle] * args.workers, strategy=args.strategy)
        try:
            ray.get(self.pg.ready(), timeout=args.schedule_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise SystemExit(
                f"the cluster cannot place {args.workers} × {bundle} within "
                f"{args.schedule_timeout:.0f} s: {ray.cluster_resources()}"
            ) from None
        self.workers = [
            Worker.options(
                num_cpus=args.cpus_per_worker,
                num_gpus=args.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i),
            ).remote()
            for i in range(args.workers)
        ]
        self.ips = ray.get([w.ip.remote() for w in self.workers])

    def stop(self, sig: int) -> None:
        for w in self.workers:
            w.stop.remote(int(sig))

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)  # the commands die with their actors (PR_SET_PDEATHSIG)
        remove_placement_group(self.pg)


def wait_all(gang: Gang, futures: list, stop_on_failure: bool, grace: float) -> list[int | None]:
    """Exit codes (None: the actor or its node died); optionally stop the rest on a failure."""
    codes: list[int | None] = [None] * len(futures)
    pending = dict(zip(futures, range(len(futures)), strict=True))
    deadline = None
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in done:
            i = pending.pop(ref)
            try:
                codes[i] = ray.get(ref)
            except ray.exceptions.RayError as e:
                print(f"[launcher] worker {i} lost: {e}", file=sys.stderr)
            failed = codes[i] != 0
            if failed and stop_on_failure and deadline is None:
                print(f"[launcher] worker {i} exited with {codes[i]}: stopping the others")
                gang.stop(signal.SIGTERM)  # JAX may ignore it; SIGKILL after the grace time
                deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            gang.stop(signal.SIGKILL)
            deadline = float("inf")
    return codes


def run_train(args, cmd: list[str]) -> int:
    """All workers run the trainer as one jax.distributed job; restart the gang on failure."""
    for attempt in range(args.max_restarts + 1):
        gang = Gang(args)
        coordinator = f"{args.coordinator_host or gang.ips[0]}:{args.coordinator_port}"
        print(f"[launcher] attempt {attempt}: coordinator {coordinator}, workers on {gang.ips}")
        base = forwarded_env(args.env) | (cpu_env(args.cpu_devices) if args.cpu_devices else {})
        futures = []
        for i, w in enumerate(gang.workers):
            env = base | {
                "JAX_COORDINATOR_ADDRESS": coordinator,
                "JAX_NUM_PROCESSES": str(args.workers),
                "JAX_PROCESS_ID": str(i),
            }
            futures.append(w.run.remote(cmd, env, args.workdir, f"[w{i}]"))
        with forward_signals(gang):
            codes = wait_all(gang, futures, stop_on_failure=True, grace=args.grace)
        gang.close()
        if all(c == 0 for c in codes):
            return 0
        # a trainer error (bad config, non-finite loss) will not improve on a rerun
        if any(c in (2, 3) for c in codes):
            break
        print(f"[launcher] exit codes {codes}; resuming from the latest checkpoint")
    return next((c for c in codes if c), 1)


def run_encode(args, cmd: list[str]) -> int:
    """Worker i encodes its share (--num-workers N --worker-index i); failed shares rerun."""
    todo = list(range(args.workers))
    base = forwarded_env(args.env)
    for attempt in range(args.max_restarts + 1):
        gang = Gang(args)
        futures = [
            w.run.remote(
                [*cmd, "--num-workers", str(args.workers), "--worker-index", str(i)],
                base,
                args.workdir,
                f"[e{i}]",
            )
            for i, w in zip(todo, gang.workers, strict=False)
        ]
        with forward_signals(gang):
            codes = wait_all(gang, futures, stop_on_failure=False, grace=args.grace)
        gang.close()
        failed = [i for i, c in zip(todo, codes, strict=False) if c != 0]
        if not failed:
            return 0
        print(f"[launcher] attempt {attempt}: workers {failed} failed; finished shards are kept")
        todo = failed
        args = argparse.Namespace(**{**vars(args), "workers": len(failed)})
    return 1


class forward_signals:
    """SIGINT/SIGTERM to the launcher → SIGTERM to every command (checkpoint, then exit)."""

    def __init__(self, gang: Gang):
        self.gang, self.old = gang, {}

    def __enter__(self):
        handler = lambda signum, frame: self.gang.stop(signal.SIGTERM)  # noqa: E731
        self.old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default="auto", help="Ray cluster; 'local' starts one here")
    p.add_argument("--num-cpus", type=int, help="with --address local: CPUs the cluster offers")
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("train", "encode"):
        s = sub.add_parser(mode)
        s.add_argument("--workers", type=int, required=True)
        s.add_argument("--gpus-per-worker", type=float, help="default 1, or 0 with --cpu-devices")
        s.add_argument("--cpus-per-worker", type=float, default=1)
        s.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices (no GPUs)")
        s.add_argument("--coordinator-port", type=int, default=DEFAULT_PORT)
        s.add_argument("--coordinator-host", default="", help="default: worker 0's node IP")
        s.add_argument("--strategy", default="PACK", help="placement: PACK, SPREAD, STRICT_*")
        s.add_argument("--max-restarts", type=int, default=0)
        s.add_argument("--grace", type=float, default=60.0, help="s before SIGKILL on failure")
        s.add_argument("--schedule-timeout", type=float, default=600.0)
        s.add_argument("--workdir", default=os.getcwd(), help="cwd of the commands")
        s.add_argument("--env", action="append", default=[], help="NAME or NAME=VALUE")
        s.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command after --")
    cpu = args.cpu_devices
    if args.gpus_per_worker is None:  # CPU workers must not wait for GPUs to be placed
        args.gpus_per_worker = 0 if cpu else 1
    elif cpu and args.gpus_per_worker:
        p.error(
            f"--cpu-devices {cpu} runs JAX on fake CPU devices: --gpus-per-worker "
            f"{args.gpus_per_worker:g} would hold GPUs it never uses; drop it or pass 0"
        )
    return args, cmd


def main(argv=None) -> int:
    args, cmd = parse(argv)
    if args.address == "local":  # a throwaway single-node cluster (tests): JAX on loopback
        args.coordinator_host = args.coordinator_host or "127.0.0.1"
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            object_store_memory=100 * 1024**2,
        )
    else:
        ray.init(address=args.address)
    try:
        return run_train(args, cmd) if args.mode == "train" else run_encode(args, cmd)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
