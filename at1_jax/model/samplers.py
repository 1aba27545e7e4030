"""DDIM and DPM-Solver++(2M) samplers with classifier-free guidance (spec section 5)."""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# denoise_fn(x_BCHW, sigma_B1, text_BD, *model_args) -> x0_BCHW, a pure JAX function.
DenoiseFn = Callable[..., jax.Array]

SAMPLERS = ("dpmpp2m", "ddim")


def noise_levels(n: int, exponent: float = 1.0) -> np.ndarray:
    """Returns f32[n] levels sigma_i = 1 − (i/n)^exponent, with sigma_0 set to 0.99."""
    if not (isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"noise_levels n must be an int >= 1, got {n!r}")
    if not (isinstance(exponent, int | float) and 0 < exponent < math.inf):
        raise ValueError(f"noise_levels exponent must be a finite number > 0, got {exponent!r}")
    return _levels_f64(n, exponent).astype(np.float32)


def _levels_f64(n: int, exponent: float) -> np.ndarray:
    sigma = 1.0 - (np.arange(n, dtype=np.float64) / n) ** exponent
    sigma[0] = 0.99
    return sigma


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings; defaults are the references' text-to-image ones (15 steps, g = 6)."""

    steps: int = 15
    guidance: float = 6.0
    sampler: str = "dpmpp2m"
    exponent: float = 1.0
    sharp_f: float = 0.0  # added to latent channel 3 of the result
    bright_f: float = 0.0  # added to latent channel 0 of the result
    seed: int = 11  # used when sample() gets no key

    def __post_init__(self):
        def bad(name, want):
            return ValueError(f"SamplerConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        def is_finite(v):
            number = isinstance(v, int | float | np.number) and not isinstance(v, bool)
            return number and math.isfinite(v)

        if not (is_int(self.steps) and self.steps >= 1):
            raise bad("steps", "an int >= 1")
        if self.sampler not in SAMPLERS:
            raise bad("sampler", f"one of {SAMPLERS}")
        if not (is_finite(self.exponent) and self.exponent > 0):
            raise bad("exponent", "a finite number > 0")
        # x0 = g·cond + (1 − g)·uncond: g < 0 would push images away from their prompt.
        if not (is_finite(self.guidance) and self.guidance >= 0):
            raise bad(
                "guidance",
                "a finite number >= 0 (0: unconditional, 1: conditional without guidance, "
                "> 1: stronger prompt adherence; the references use 4.5 to 6)",
            )
        for name in ("sharp_f", "bright_f"):
            if not is_finite(getattr(self, name)):
                raise bad(name, "a finite number")
        if not is_int(self.seed):
            raise bad("seed", "an int")
        # Levels that round to 0 would divide by zero in the update (exponent near 0).
        if _levels_f64(self.steps, self.exponent).min() <= 0:
            raise bad("exponent", f"large enough that all {self.steps} noise levels are > 0")


class Schedule(NamedTuple):
    """Per-step float32 constants; step i goes from sigma[i] to sigma[i + 1], i < steps − 1."""

    sigma: jax.Array  # [n] the levels; the model is called once at each
    c_x0: jax.Array  # [n-1] D = c_x0·x0 − c_prev·x0_prev
    c_prev: jax.Array  # [n-1]
    c_d: jax.Array  # [n-1] x_next = c_d·D + c_x·x, c_d = (sigma_c − sigma_n)/sigma_c
    c_x: jax.Array  # [n-1] c_x = sigma_n/sigma_c


def make_schedule(cfg: SamplerConfig) -> Schedule:
    """Precomputes the step coefficients of cfg in float64 and casts them once to float32."""
    sigma = _levels_f64(cfg.steps, cfg.exponent)
    sigma_c, sigma_n = sigma[:-1], sigma[1:]
    c_prev = np.zeros_like(sigma_c)
    if cfg.sampler == "dpmpp2m" and cfg.steps > 2:
        lam = np.log((1 - sigma) / sigma)
        h = np.diff(lam)
        with np.errstate(divide="ignore", invalid="ignore"):
            half_inv_r = h[1:] / (2 * h[:-1])  # 1/(2r) with r = h_{i-1}/h_i
        # h_{i-1} = 0 only if sigma_1 == sigma_0 == 0.99 (steps = 100, exponent = 1); take a
        # first-order step there rather than dividing by zero.
        c_prev[1:] = np.where(np.isfinite(half_inv_r), half_inv_r, 0.0)
    # The first step has no x0_prev: c_prev[0] = 0, so DPM++ starts with D = x0 like DDIM.
    coeffs = (sigma, 1 + c_prev, c_prev, (sigma_c - sigma_n) / sigma_c, sigma_n / sigma_c)
    return Schedule(*(jnp.asarray(c, jnp.float32) for c in coeffs))


def guided_x0(
    denoise_fn: DenoiseFn,
    x_BCHW: jax.Array,
    sigma: jax.Array,
    text_BD: jax.Array,
    guidance: float,
    model_args: Sequence = (),
) -> jax.Array:
    """One model call on [x, x] with text [cond, zeros]; returns g·x0_cond + (1 − g)·x0_uncond."""
    b = x_BCHW.shape[0]
    x_2BCHW = jnp.concatenate([x_BCHW, x_BCHW])
    text_2BD = jnp.concatenate([text_BD, jnp.zeros_like(text_BD)])
    sigma_2B1 = jnp.full((2 * b, 1), sigma, jnp.float32)
    x0_2BCHW = denoise_fn(x_2BCHW, sigma_2B1, text_2BD, *model_args).astype(jnp.float32)
    return guidance * x0_2BCHW[:b] + (1 - guidance) * x0_2BCHW[b:]


def sampler_step(
    denoise_fn: DenoiseFn,
    text_BD: jax.Array,
    x_BCHW: jax.Array,
    x0_prev: jax.Array,
    i: jax.Array | int,
    schedule: Schedule,
    guidance: float,
    model_args: Sequence = (),
) -> tuple[jax.Array, jax.Array]:
    """Step i (sigma[i] → sigma[i+1]): returns (x_next, guided x0 at sigma[i])."""
    x0 = guided_x0(denoise_fn, x_BCHW, schedule.sigma[i], text_BD, guidance, model_args)
    d = schedule.c_x0[i] * x0 - schedule.c_prev[i] * x0_prev
    return schedule.c_d[i] * d + schedule.c_x[i] * x_BCHW, x0


def sample(
    denoise_fn: DenoiseFn,
    text_BD: jax.Array,
    key_or_noise: jax.Array | None,
    cfg: SamplerConfig,
    latent_shape: Sequence[int],
    model_args: Sequence = (),
) -> jax.Array:
    """Samples f32[B, C, H, W] latents for B prompts with exactly cfg.steps model calls.

    key_or_noise: a PRNG key for the start noise x ~ N(0, I), the start noise itself (a float
    array of shape (B, C, H, W)), or None for jax.random.key(cfg.seed). model_args are passed
    through to denoise_fn after text (e.g. the model state, so that it is not baked into the
    compiled function as constants). The nudges add cfg.sharp_f to channel 3 only when C > 3
    and cfg.bright_f to channel 0; other latent layouts keep their channels untouched.
    """
    c, h, w = latent_shape
    shape = (text_BD.shape[0], c, h, w)
    if key_or_noise is None:
        key_or_noise = jax.random.key(cfg.seed)
    if jnp.issubdtype(key_or_noise.dtype, jnp.floating):
        if key_or_noise.shape != shape:
            raise ValueError(f"start noise shape {key_or_noise.shape} != {shape}")
        x = key_or_noise.astype(jnp.float32)
    else:
        x = jax.random.normal(key_or_noise, shape, jnp.float32)

    schedule = make_schedule(cfg)

    def body(carry, i):
        x, x0_prev = carry
        x, x0 = sampler_step(denoise_fn, text_BD, x, x0_prev, i, schedule, cfg.guidance, model_args)
        return (x, x0), None

    if cfg.steps > 1:  # one step has no updates, and scan would still trace body once
        (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(cfg.steps - 1))
    x0 = guided_x0(denoise_fn, x, schedule.sigma[-1], text_BD, cfg.guidance, model_args)
    if cfg.sharp_f and c > 3:
        x0 = x0.at[:, 3].add(cfg.sharp_f)
    if cfg.bright_f and c > 0:
        x0 = x0.at[:, 0].add(cfg.bright_f)
    return x0


def start_noise(seeds_B, latent_shape: Sequence[int]) -> jax.Array:
    """f32[B, C, H, W] N(0, I) start noise, one PRNG stream per seed: an image depends on its
    seed only, not on the batch it is sampled in (what `sample --seed` and sheets label)."""
    shape = tuple(int(d) for d in latent_shape)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds_B, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def make_sampler(
    denoise_fn: DenoiseFn, cfg: SamplerConfig, latent_shape: Sequence[int]
) -> Callable[..., jax.Array]:
    """Returns jitted (text_BD, key_or_noise=None, *model_args) -> x0, compiled once per shape."""
    latent_shape = tuple(int(d) for d in latent_shape)
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {latent_shape!r}")

    @jax.jit
    def run(text_BD, key_or_noise=None, *model_args):
        return sample(denoise_fn, text_BD, key_or_noise, cfg, latent_shape, model_args)

    return run
