"""Compiles the train step so that, on CPU, its temporaries stay mapped from step to step.

XLA:CPU allocates a step's temporaries afresh for every execution, in one block. glibc
serves blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps them
on free, so the kernel zeroes every page again each step: `clear_page_erms` was 8-13% of
`tld-tiny`'s CPU samples. Two changes keep the memory instead:

- glibc: every block up to 32 MiB from malloc's heaps (`M_MMAP_THRESHOLD`), heaps neither
  trimmed (`M_TRIM_THRESHOLD`) nor unmapped once empty (`M_TOP_PAD` above glibc's 64 MiB
  heap size: `heap_trim` keeps a heap whose removal would leave less than that free).
- XLA: the temporaries split into heaps of at most 31 MiB
  (`xla_multiheap_size_constraint_per_heap`), each under the threshold. Buffers in different
  heaps cannot share memory, so the split is kept only where it does not grow the
  temporaries (`tld-tiny`: 75.8 MiB either way; `at1`: 2.9 → 4.2 GiB, so not tried there).

The cost: freed memory stays with the process (its peak RSS, not more, in steady state).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import jax

log = logging.getLogger(__name__)

# glibc's limit on M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); the heaps are 64 MiB.
GLIBC_MMAP_THRESHOLD = 32 << 20
HEAP_BYTES = 31 << 20  # one split heap: under the threshold, room for malloc's header
KEEP_PAD = 64 << 20  # M_TOP_PAD ≥ glibc's heap size: empty heaps are never unmapped
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB free at a heap's top before trimming
# Temporaries above this are mostly single buffers larger than a heap (at1: 2.9 GiB), which
# the split cannot keep; trying it would only cost a second compile.
SPLIT_MAX_BYTES = 1 << 30
SPLIT_GROWTH = 1.05  # keep the split if it grows the temporaries by at most 5%

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory mapped (once per process); False elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS have no mallopt knobs)
    except (OSError, TypeError, AttributeError):
        return False
    settings = (
        (_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD),
        (_M_TOP_PAD, KEEP_PAD),
        (_M_TRIM_THRESHOLD, NEVER_TRIM),
    )
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not ok:
        log.info("glibc refused a mallopt setting: step temporaries are mapped afresh")
    return ok


def worth_splitting(temp_bytes: int) -> bool:
    """Whether a step with these temporaries (per device) may gain from the heap split."""
    return GLIBC_MMAP_THRESHOLD < temp_bytes <= SPLIT_MAX_BYTES


def compile_step(jitted, *args) -> jax.stages.Compiled:
    """`jitted.lower(*args).compile()`, on CPU with temporaries kept mapped where it pays."""
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    if jax.default_backend() != "cpu" or not keep_freed_memory():
        return compiled
    temp = _temp_bytes(compiled)
    if temp is None or not worth_splitting(temp):
        return compiled
    split = lowered.compile({"xla_multiheap_size_constraint_per_heap": HEAP_BYTES})
    split_temp = _temp_bytes(split)
    if split_temp is None or split_temp > temp * SPLIT_GROWTH:
        log.info("heap split not used: temporaries %d → %s bytes", temp, split_temp)
        return compiled
    return split


def _temp_bytes(compiled) -> int | None:
    memory = compiled.memory_analysis()
    return memory.temp_size_in_bytes if memory else None
