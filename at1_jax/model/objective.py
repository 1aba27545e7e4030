"""Training objective of the AT-1/TLD denoiser (spec section 4): x0 prediction on a linear path."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

# sample_sigma clips into [SIGMA_EPS, 1 - SIGMA_EPS]. jax.random.beta returns exact 0.0 and
# 1.0 in float32 (about 5 per million draws of 1.0 for Beta(0.75, 0.75), far more for small
# a or b), while the spec keeps sigma in the open interval (0, 1). 1e-5 is well inside float32
# resolution at 1 (ulp 6e-8) and moves < 2e-4 of the Beta(0.75, 0.75) mass.
SIGMA_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Noise-level distribution Beta(beta_a, beta_b) and CFG text dropout rate; AT-1 defaults."""

    beta_a: float = 0.75
    beta_b: float = 0.75
    cfg_drop: float = 0.15

    def __post_init__(self):
        for name in ("beta_a", "beta_b"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(
                    f"ObjectiveConfig.{name} must be a finite number > 0, got {value!r}"
                )
        if not (isinstance(self.cfg_drop, int | float) and 0 <= self.cfg_drop <= 1):
            raise ValueError(f"ObjectiveConfig.cfg_drop must be in [0, 1], got {self.cfg_drop!r}")


AT1_OBJECTIVE = ObjectiveConfig()
# TLD's current code draws mostly low noise levels.
TLD_OBJECTIVE = ObjectiveConfig(beta_a=1.0, beta_b=2.5)


class TrainingInputs(NamedTuple):
    """What the network sees in one training step; the loss target is the clean x itself."""

    x_noisy: jax.Array  # f32[B, C, H, W]
    sigma: jax.Array  # f32[B, 1]
    text: jax.Array  # [B, D], dtype of the input text


def sample_sigma(key: jax.Array, batch: int, a: float, b: float) -> jax.Array:
    """Draws f32[batch, 1] noise levels from Beta(a, b), clipped into the open interval (0, 1)."""
    sigma_B1 = jax.random.beta(key, a, b, (batch, 1), dtype=jnp.float32)
    return jnp.clip(sigma_B1, SIGMA_EPS, 1.0 - SIGMA_EPS)


def add_noise(x: jax.Array, sigma: jax.Array, eps: jax.Array) -> jax.Array:
    """Returns sigma·eps + (1 − sigma)·x with sigma (B, 1) broadcast over x's trailing dims."""
    sigma = jnp.reshape(sigma, (x.shape[0],) + (1,) * (x.ndim - 1))
    return sigma * eps + (1 - sigma) * x


def drop_text(key: jax.Array, text_BD: jax.Array, p: float) -> jax.Array:
    """Replaces each row of text_BD by zeros with probability p (classifier-free guidance)."""
    drop_B1 = jax.random.bernoulli(key, p, (text_BD.shape[0], 1))
    return jnp.where(drop_B1, jnp.zeros_like(text_BD), text_BD)


def x0_loss(pred: jax.Array, x: jax.Array) -> jax.Array:
    """Mean squared error over all elements, in float32 whatever the input dtypes."""
    # fp16 squares overflow above 256 and the reference's fp16 loss was a known defect (spec 7).
    diff = pred.astype(jnp.float32) - x.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))


def ema_update(ema_params, params, decay: float):
    """Returns ema·decay + (1 − decay)·params leaf by leaf, each leaf keeping ema's dtype."""

    def update(ema, new):
        ema, new = jnp.asarray(ema), jnp.asarray(new)
        if not jnp.issubdtype(ema.dtype, jnp.inexact):
            # Counters, PRNG keys and other non-float leaves are not averaged: follow params.
            return new
        # Average in at least fp32 so a bf16 EMA still moves by (1 − decay)·delta.
        dtype = jnp.promote_types(ema.dtype, jnp.float32)
        out = ema.astype(dtype) * decay + (1 - decay) * new.astype(dtype)
        return out.astype(ema.dtype)

    return jax.tree.map(update, ema_params, params)


def training_targets(
    key: jax.Array,
    x: jax.Array,
    text_BD: jax.Array,
    cfg: ObjectiveConfig,
    sigma_sharding: jax.sharding.Sharding | None = None,
) -> TrainingInputs:
    """Draws sigma, noise and text dropout from one key; returns (x_noisy, sigma, text)."""
    key_sigma, key_eps, key_drop = jax.random.split(key, 3)
    sigma_B1 = sample_sigma(key_sigma, x.shape[0], cfg.beta_a, cfg.beta_b)
    if sigma_sharding is not None:  # a replicated one, from a sharded step
        # Beta draws are rejection loops: split over the batch, every device waits on every
        # loop iteration for the others (a predicate all-reduce, across hosts in multi-process
        # runs). B numbers cost nothing to draw on every device.
        sigma_B1 = jax.lax.with_sharding_constraint(sigma_B1, sigma_sharding)
    # Noise and the noisy latent are float32 whatever x's storage dtype (latents are kept fp16).
    eps = jax.random.normal(key_eps, x.shape, jnp.float32)
    x_noisy = add_noise(x.astype(jnp.float32), sigma_B1, eps)
    return TrainingInputs(x_noisy, sigma_B1, drop_text(key_drop, text_BD, cfg.cfg_drop))
