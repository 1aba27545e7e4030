"""Joining the processes of a multi-host run through jax.distributed, and stopping together.

Process facts come from the config, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (set by launch/local.py, the Ray and Akash launchers), else from JAX's own
cluster auto-detection (SLURM, Open MPI, Kubernetes indexed Jobs / JobSet).
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from at1_jax.train.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _cluster_env() -> bool:
    """True when a scheduler that JAX auto-detects says this is one of several processes."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return "JOB_COMPLETION_INDEX" in os.environ or "JOBSET_NAME" in os.environ


def initialize(cfg: DistributedConfig) -> None:
    """Call jax.distributed.initialize when this process is one of several (before any JAX use)."""
    if cfg.initialize == "never":
        return
    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    explicit = bool(coordinator) and num > 1
    if cfg.initialize == "auto" and not (explicit or _cluster_env()):
        return
    kwargs = {}
    if explicit:
        if pid < 0:
            raise ConfigError(
                f"distributed: coordinator {coordinator} and {num} processes given but no "
                "process id: set config.distributed.process_id or JAX_PROCESS_ID"
            )
        kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d joined", jax.process_index(), jax.process_count())


class StopSignal:
    """SIGTERM/SIGINT → save a checkpoint and exit, at the same step on every process.

    Created first thing (before jax.distributed and compiling), so a signal during start-up
    stops the run cleanly instead of killing it. One process: our handler sets a flag.
    Several (after `joined()`): jax.distributed has installed its preemption notifier for
    SIGTERM, and `reached_preemption_sync_point` makes every process agree on the step;
    SIGINT, and a signal that arrived before joining, are passed to it as SIGTERM.
    """

    def __init__(self):
        self.multi = False
        self.signum = None
        self._previous = {sig: signal.signal(sig, self._flag) for sig in STOP_SIGNALS}

    def joined(self) -> None:
        """Switch to JAX's preemption sync when this process is one of several."""
        if jax.process_count() == 1:
            return
        self.multi = True
        self._previous.pop(signal.SIGTERM)  # JAX's notifier owns it now: leave it in place
        signal.signal(signal.SIGINT, self._forward)
        if self.signum is not None:
            os.kill(os.getpid(), signal.SIGTERM)

    def _flag(self, signum, frame):
        self.signum = signum

    def _forward(self, signum, frame):
        self.signum = signum
        os.kill(os.getpid(), signal.SIGTERM)

    @property
    def requested_here(self) -> bool:
        """A signal reached this process (for decisions that need no agreement)."""
        return self.signum is not None

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step` (a collective when several run)."""
        if self.multi:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signum is not None

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def allgather_rows(row: list[int]) -> list[list[int]]:
    """Every process's `row`, in process order (identical on all processes)."""
    local = np.asarray(row, np.int64)
    if jax.process_count() == 1:
        return [local.tolist()]
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, local.size).tolist()
