"""Which slice of the input this process handles: CLI flags, torchrun or SLURM variables."""

from __future__ import annotations

import os


def resolve_worker(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """(num_workers, worker_index) from flags, else RANK/WORLD_SIZE, else SLURM, else (1, 0)."""
    env = os.environ
    if num_workers is None and worker_index is None:
        for count_var, index_var in (
            ("WORLD_SIZE", "RANK"),
            ("SLURM_NTASKS", "SLURM_PROCID"),
            ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"),
        ):
            if count_var in env and index_var in env:
                num_workers, worker_index = int(env[count_var]), int(env[index_var])
                break
        else:
            num_workers, worker_index = 1, 0
    elif num_workers is None or worker_index is None:
        raise ValueError("--num-workers and --worker-index must be given together")
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker index {worker_index} not in [0, {num_workers})")
    return num_workers, worker_index


def my_groups(num_groups: int, num_workers: int, worker_index: int) -> list[int]:
    """Groups of this worker: round-robin, so workers' shards are disjoint and balanced."""
    return list(range(worker_index, num_groups, num_workers))
