#!/usr/bin/env python3
"""Start N processes of one command on this machine, joined through jax.distributed.

    python launch/local.py --processes 2 --devices-per-process 2 -- \
        python -m at1_jax.train --config configs/cpu.py

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read by at1_jax.train.distributed), and its own devices: on CPU
JAX_NUM_CPU_DEVICES fake devices and an equal share of this machine's cores for XLA's
thread pool (PJRT_NPROC, unless PJRT_NPROC or NPROC is set: with a thread per core in
every process, 2 processes on 2 cores took 1.19x one process's step time, 1.10-1.13x
without), on GPU a slice of CUDA_VISIBLE_DEVICES. Output lines are
prefixed with [pN]. SIGINT/SIGTERM are forwarded to every process; if one process fails,
the others are stopped and its exit code is returned.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_env(
    base: dict, i: int, n: int, port: int, devices: int, gpus: list[str], cores: int | None = None
) -> dict:
    """The environment of process i of n; `cores`: the machine's usable cores (default: ours)."""
    env = dict(base)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
    )
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * devices : (i + 1) * devices])
    else:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if "host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        if "PJRT_NPROC" not in env and "NPROC" not in env:  # XLA:CPU's pool size, read by PJRT
            env["PJRT_NPROC"] = str(max(1, (cores or usable_cores()) // n))
    return env


def _die_with_parent():
    """SIGKILL this child if the launcher dies (even by SIGKILL): no orphaned JAX processes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream, prefix: str, out):
    """Copy a child's output with a prefix per line; a carriage return ends a line too."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    at_start = True
    while chunk := stream.read1(65536):
        for part in re.split(r"([\r\n])", decode(chunk)):
            if part and at_start and part not in "\r\n":
                out.write(f"{prefix} ")
                at_start = False
            out.write(part)
            at_start = at_start or part in ("\r", "\n")
        out.flush()


def launch(cmd: list[str], n: int, devices: int, gpus: list[str], grace: float = 30.0) -> int:
    """Run `cmd` n times as one jax.distributed job; returns the job's exit code."""
    if gpus and len(gpus) < n * devices:
        raise SystemExit(f"need {n * devices} GPUs, CUDA_VISIBLE_DEVICES has {len(gpus)}")
    port, cores = free_port(), usable_cores()
    procs, pumps = [], []
    for i in range(n):
        env = process_env(os.environ, i, n, port, devices, gpus, cores)
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                code = failed[0].returncode
                deadline = time.monotonic() + grace
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.2)
                for p in procs:  # JAX ignores SIGTERM after jax.distributed starts
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
        code = code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=1)
    p.add_argument("--gpus", action="store_true", help="split CUDA_VISIBLE_DEVICES among processes")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run in every process")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command after --")
    gpus = []
    if args.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = args.processes * args.devices_per_process
        gpus = visible.split(",") if visible else [str(i) for i in range(count)]
    return launch(cmd, args.processes, args.devices_per_process, gpus)


if __name__ == "__main__":
    sys.exit(main())
