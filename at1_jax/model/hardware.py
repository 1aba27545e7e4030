"""Which compute dtype this machine runs fastest: `model.dtype="auto"` resolves here."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import jax

# x86 flags of CPUs with bfloat16 dot-product instructions (XLA:CPU's YNNPACK path uses them).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def auto_dtype_reason() -> tuple[str, str]:
    """(dtype, why) for `model.dtype="auto"` on this process's default backend."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "bfloat16", "TPU"
    if backend == "gpu":
        cc = getattr(jax.devices()[0], "compute_capability", None)
        if cc is None or float(cc) >= 8.0:
            return "bfloat16", f"GPU (compute capability {cc or 'unknown'})"
        return "float32", f"GPU of compute capability {cc} < 8.0 (no fast bfloat16)"
    found = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    if platform.machine() in ("x86_64", "AMD64") and found:
        return "bfloat16", f"CPU with {found[0].upper()}"
    return "float32", "CPU without bfloat16 dot products"


def resolve_dtype(dtype: str) -> str:
    """`dtype` itself, or for "auto" the fastest compute dtype here (bfloat16 or float32)."""
    return auto_dtype_reason()[0] if dtype == "auto" else dtype
