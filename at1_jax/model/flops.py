"""FLOP accounting for MFU: analytic per-image training FLOPs, XLA's count, chip peaks."""

from __future__ import annotations

from at1_jax.model.denoiser import DenoiserConfig

# Dense bf16 peak per chip (not the sparsity figures), for MFU.
PEAK_FLOPS = {"a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12, "l4": 121e12}


def peak_flops(device) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (e.g. CPU)."""
    kind = device.device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def analytic_train_flops(cfg: DenoiserConfig) -> float:
    """Matmul FLOPs of one training image (forward ×3), from the architecture alone."""
    T, E, L, H = cfg.num_tokens, cfg.width, cfg.depth, cfg.mlp_mult * cfg.width
    per_block = 2 * T * (3 * E * E + E * E + 2 * H * E + 9 * H)  # qkv, q, MLP, depthwise
    per_block += 2 * 2 * T * T * E  # self-attention scores and values
    per_block += 2 * 2 * T * 2 * E + 2 * 2 * 2 * E * E  # cross-attention, kv of 2 tokens
    P = cfg.patch_dim
    outer = 2 * T * (P * P + P * E + E * P)
    return 3.0 * (L * per_block + outer)


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA counts for a compiled computation (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
