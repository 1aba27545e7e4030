"""Tests for the DDIM / DPM-Solver++(2M) samplers in at1_jax/sampling.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at1_jax.model import samplers as sampling

SHAPE = (4, 4, 4)  # (C, H, W): small, but with the 4 latent channels the nudges address
D = 6
B = 3

_rng = np.random.default_rng(0)
W_PROJ = _rng.normal(size=(D, int(np.prod(SHAPE)))) / np.sqrt(D)
TEXT = _rng.normal(size=(B, D)).astype(np.float32)
NOISE = _rng.normal(size=(B, *SHAPE)).astype(np.float32)


def _coeffs(sigma, xp):
    # Nonlinear in sigma so a wrong level at any call changes the result.
    return 0.3 + 0.5 * sigma, 1.0 + sigma**2


def linear_denoise(x, sigma, text):
    """x0 = a(sigma)·x + b(sigma)·(text @ W), in JAX float32."""
    a, b = _coeffs(sigma.astype(jnp.float32), jnp)
    proj = (text @ jnp.asarray(W_PROJ, jnp.float32)).reshape(x.shape)
    return a[:, :, None, None] * x + b[:, :, None, None] * proj


def linear_denoise_np(x, sigma, text):
    """The same map in NumPy float64, sigma a scalar."""
    a, b = _coeffs(sigma, np)
    return a * x + b * (text @ W_PROJ).reshape(x.shape)


def reference_sample(
    denoise_np, text, noise, steps, guidance, sampler, exponent=1.0, invert_r=False
):
    """Spec section 5 as written, in float64 with a Python loop (invert_r: a planted bug)."""
    n = steps
    sig = np.array([1.0 - (i / n) ** exponent for i in range(n)])
    sig[0] = 0.99
    lam = np.log((1 - sig) / sig)
    text = np.asarray(text, np.float64)

    def guided(x, s):
        cond = denoise_np(x, s, text)
        uncond = denoise_np(x, s, np.zeros_like(text))
        return guidance * cond + (1 - guidance) * uncond

    x = np.asarray(noise, np.float64)
    x0_prev = None
    for i in range(n - 1):
        sc, sn = sig[i], sig[i + 1]
        x0 = guided(x, sc)
        if sampler == "ddim" or i == 0:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            r = 1 / r if invert_r else r
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = ((sc - sn) * d + sn * x) / sc
        x0_prev = x0
    return guided(x, sig[-1])


@pytest.mark.parametrize(("n", "e"), [(1, 1.0), (2, 1.0), (15, 1.0), (40, 2.0), (7, 0.5)])
def test_noise_levels_match_float64_formula(n, e):
    want = np.array([0.99] + [1.0 - (i / n) ** e for i in range(1, n)], np.float64)
    got = sampling.noise_levels(n, e)
    assert got.dtype == np.float32 and got.shape == (n,)
    # Computed in float64 and rounded once: at most one float32 ulp (<= 1.2e-7 relative) from
    # the float64 formula, allowing for a 1-ulp float64 pow difference flipping the rounding.
    np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=0)


def test_noise_levels_validation():
    with pytest.raises(ValueError, match="n must be"):
        sampling.noise_levels(0)
    with pytest.raises(ValueError, match="exponent"):
        sampling.noise_levels(5, -1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("steps", 2.5), ("guidance", float("nan")), ("guidance", -1.0),
     ("guidance", -1e-9), ("sampler", "euler"),
     ("exponent", 0.0), ("sharp_f", float("inf")), ("seed", "x"), ("exponent", 1e-30)],
)  # fmt: skip
def test_sampler_config_validation(field, value):
    with pytest.raises(ValueError, match=rf"SamplerConfig\.{field} .*{re.escape(repr(value))}"):
        sampling.SamplerConfig(**{field: value})


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
@pytest.mark.parametrize(
    ("steps", "guidance", "exponent"), [(10, 6.0, 1.0), (7, 4.5, 2.0), (40, 6.0, 1.0)]
)
def test_matches_float64_reference(sampler, steps, guidance, exponent):
    cfg = sampling.SamplerConfig(steps=steps, guidance=guidance, sampler=sampler, exponent=exponent)
    got = np.asarray(sampling.make_sampler(linear_denoise, cfg, SHAPE)(TEXT, jnp.asarray(NOISE)))
    want = reference_sample(linear_denoise_np, TEXT, NOISE, steps, guidance, sampler, exponent)
    # float32 vs float64: each step adds a few float32 roundings (~4·6e-8 of the state's
    # scale); the linear map is contracting (c_x + c_d·a <= 1), so they at most add up over
    # the n <= 40 steps (<= 1e-5), and the last guided combination g·c + (1−g)·u amplifies one
    # rounding by |g| + |1−g| <= 11 (~7e-7). Observed: ~2e-7. A wrong level, ratio r or
    # coefficient moves the result by > 1e-3 of its scale (see the next test).
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale


def test_reference_comparison_is_sensitive():
    # The tolerance above must catch a plausible bug: here r inverted (r = h_i/h_{i−1}), which
    # moves the result by ~3e-3 of its scale, 300 times the tolerance.
    cfg = sampling.SamplerConfig(steps=8, guidance=6.0, sampler="dpmpp2m", exponent=2.0)
    got = np.asarray(sampling.make_sampler(linear_denoise, cfg, SHAPE)(TEXT, jnp.asarray(NOISE)))
    bad = reference_sample(linear_denoise_np, TEXT, NOISE, 8, 6.0, "dpmpp2m", 2.0, True)
    assert np.abs(got - bad).max() > 1e-3 * np.abs(bad).max()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_model_called_n_times_at_the_levels(sampler):
    steps = 6
    calls = []

    def record(x, sigma, text):
        calls.append((np.asarray(x), np.asarray(sigma), np.asarray(text)))

    def counting_denoise(x, sigma, text):
        jax.debug.callback(record, x, sigma, text, ordered=True)
        return linear_denoise(x, sigma, text)

    cfg = sampling.SamplerConfig(steps=steps, sampler=sampler)
    out = sampling.make_sampler(counting_denoise, cfg, SHAPE)(TEXT, jnp.asarray(NOISE))
    out.block_until_ready()
    jax.effects_barrier()
    assert len(calls) == steps
    levels = sampling.noise_levels(steps)
    for (x, sigma, text), level in zip(calls, levels, strict=True):
        assert x.shape == (2 * B, *SHAPE) and sigma.shape == (2 * B, 1)
        np.testing.assert_array_equal(x[:B], x[B:])  # the batch is [x, x]
        assert (sigma == level).all()
        np.testing.assert_array_equal(text[:B], TEXT)  # text is [cond, zeros]
        assert (text[B:] == 0).all()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_exact_x0_returns_target(sampler):
    target = jnp.asarray(_rng.normal(size=(B, *SHAPE)), jnp.float32)

    def oracle(x, sigma, text):
        return jnp.concatenate([target, target])

    cfg = sampling.SamplerConfig(steps=8, sampler=sampler)
    out = sampling.make_sampler(oracle, cfg, SHAPE)(TEXT, jnp.asarray(NOISE))
    # The result is g·x* + (1−g)·x* = 6x* − 5x*: two roundings of size <= 2^-24·6|x*|, so
    # 1e-6·max|x*| is a strict bound.
    np.testing.assert_allclose(out, target, rtol=0, atol=1e-6 * float(jnp.abs(target).max()))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_exact_x0_keeps_state_on_the_straight_path(sampler):
    # With D = x* at every step (DPM++: (1 + c)·x* − c·x* = x*), the update gives
    # x_{i+1} − x* = (sigma_{i+1}/sigma_i)(x_i − x*), so before the last call
    # x = x* + (sigma_{n−1}/sigma_0)(noise − x*). The oracle returns x itself at the last level
    # so the sampler's output is that state.
    steps = 8
    target = jnp.asarray(_rng.normal(size=(B, *SHAPE)), jnp.float32)
    last = sampling.noise_levels(steps)[-1]

    def oracle(x, sigma, text):
        at_last = (sigma == last)[:, :, None, None]
        return jnp.where(at_last, x, jnp.concatenate([target, target]))

    cfg = sampling.SamplerConfig(steps=steps, sampler=sampler)
    out = sampling.make_sampler(oracle, cfg, SHAPE)(TEXT, jnp.asarray(NOISE))
    ratio = (1 - (steps - 1) / steps) / 0.99
    want = np.asarray(target, np.float64) + ratio * (NOISE - np.asarray(target, np.float64))
    # Values are O(3); 8 steps of a few float32 roundings (6e-8 relative) plus the guidance
    # combination (amplifies by 11) stay well under 1e-5.
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


def test_degenerate_first_interval_falls_back_to_first_order():
    # steps = 10, exponent = 2: sigma_1 = 1 − 0.1² = 0.99 = sigma_0, so h_0 = 0 and r = 0; the
    # spec's formula would divide by zero at step 1. That step is taken first order instead.
    cfg = sampling.SamplerConfig(steps=10, sampler="dpmpp2m", exponent=2.0)
    schedule = sampling.make_schedule(cfg)
    assert schedule.sigma[1] == schedule.sigma[0]
    assert schedule.c_prev[1] == 0 and schedule.c_prev[2] != 0
    out = sampling.make_sampler(linear_denoise, cfg, SHAPE)(TEXT, jnp.asarray(NOISE))
    assert bool(jnp.isfinite(out).all())


def test_dpmpp_first_step_equals_ddim():
    x = jnp.asarray(NOISE)
    garbage_prev = jnp.asarray(_rng.normal(size=(B, *SHAPE)) * 100, jnp.float32)
    text = jnp.asarray(TEXT)
    step = {}
    for name in ("ddim", "dpmpp2m"):
        schedule = sampling.make_schedule(sampling.SamplerConfig(steps=10, sampler=name))
        step[name] = [
            sampling.sampler_step(linear_denoise, text, x, garbage_prev, i, schedule, 6.0)[0]
            for i in (0, 1)
        ]
    # Step 0 has no x0_prev: DPM++ uses D = x0, identical to DDIM bit for bit.
    np.testing.assert_array_equal(step["ddim"][0], step["dpmpp2m"][0])
    # Step 1 is second order (it uses x0_prev), so the test above is not vacuous.
    assert float(jnp.abs(step["ddim"][1] - step["dpmpp2m"][1]).max()) > 1e-2

    # End to end: with 2 steps there is only the first update, so the samplers agree exactly.
    outs = [
        sampling.make_sampler(linear_denoise, sampling.SamplerConfig(steps=2, sampler=s), SHAPE)(
            text, jnp.asarray(NOISE)
        )
        for s in ("ddim", "dpmpp2m")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_guidance_one_is_the_conditional_prediction(sampler):
    def cond_only(x, sigma, text):
        # Feeds the conditional text to both halves: the uncond branch never sees zeros.
        b = text.shape[0] // 2
        return linear_denoise(x, sigma, jnp.concatenate([text[:b], text[:b]]))

    cfg = sampling.SamplerConfig(steps=6, guidance=1.0, sampler=sampler)
    key = jnp.asarray(NOISE)
    got = sampling.make_sampler(linear_denoise, cfg, SHAPE)(TEXT, key)
    want = sampling.make_sampler(cond_only, cfg, SHAPE)(TEXT, key)
    # 1·c + 0·u == c exactly for finite u.
    np.testing.assert_array_equal(got, want)
    # The text matters here: guidance 6 gives a different answer.
    cfg6 = sampling.SamplerConfig(steps=6, guidance=6.0, sampler=sampler)
    other = sampling.make_sampler(linear_denoise, cfg6, SHAPE)(TEXT, key)
    assert float(jnp.abs(other - got).max()) > 1e-2


def test_seed_determinism():
    f = sampling.make_sampler(linear_denoise, sampling.SamplerConfig(steps=4), SHAPE)
    a = f(TEXT, jax.random.key(11))
    np.testing.assert_array_equal(a, f(TEXT, jax.random.key(11)))
    np.testing.assert_array_equal(a, f(TEXT))  # no key: SamplerConfig.seed (11)
    assert float(jnp.abs(a - f(TEXT, jax.random.key(12))).max()) > 1e-2
    assert a.dtype == jnp.float32 and a.shape == (B, *SHAPE)


def test_nudges():
    base = sampling.SamplerConfig(steps=3, sampler="ddim")
    nudged = sampling.SamplerConfig(steps=3, sampler="ddim", sharp_f=0.5, bright_f=-0.25)
    key = jnp.asarray(NOISE)
    a = sampling.make_sampler(linear_denoise, base, SHAPE)(TEXT, key)
    b = sampling.make_sampler(linear_denoise, nudged, SHAPE)(TEXT, key)
    delta = np.asarray(b - a, np.float64)
    # x + 0.5 − x differs from 0.5 by float32 rounding of |x| ~ O(10): 1e-5 is ample.
    np.testing.assert_allclose(delta[:, 3], 0.5, atol=1e-5)
    np.testing.assert_allclose(delta[:, 0], -0.25, atol=1e-5)
    np.testing.assert_array_equal(delta[:, 1:3], 0.0)

    # Three channels: no channel 3 to sharpen; brightness still applies.
    shape3 = (3, 4, 4)

    def denoise3(x, sigma, text):
        return 0.5 * x + (text @ jnp.ones((D, 48), jnp.float32)).reshape(x.shape)

    key3 = jnp.asarray(NOISE[:, :3])
    a3 = sampling.make_sampler(denoise3, base, shape3)(TEXT, key3)
    b3 = sampling.make_sampler(denoise3, nudged, shape3)(TEXT, key3)
    np.testing.assert_allclose(b3[:, 0] - a3[:, 0], -0.25, atol=1e-5)
    np.testing.assert_array_equal(b3[:, 1:], a3[:, 1:])


def test_model_args_are_passed_through_not_baked():
    # Weights as an argument: a new value takes effect without retracing stale constants.
    def scaled(x, sigma, text, w):
        return w * linear_denoise(x, sigma, text)

    f = sampling.make_sampler(scaled, sampling.SamplerConfig(steps=1), SHAPE)
    one = f(TEXT, jnp.asarray(NOISE), jnp.float32(1.0))
    two = f(TEXT, jnp.asarray(NOISE), jnp.float32(2.0))
    # One step: the output is the single guided prediction, linear in w.
    np.testing.assert_allclose(two, 2 * one, rtol=1e-6, atol=1e-6)


def test_noise_shape_is_checked():
    f = sampling.make_sampler(linear_denoise, sampling.SamplerConfig(steps=2), SHAPE)
    with pytest.raises(ValueError, match="start noise shape"):
        f(TEXT, jnp.zeros((B, 4, 4, 5), jnp.float32))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_guidance_zero_is_the_unconditional_prediction(sampler):
    def uncond_only(x, sigma, text):
        # Feeds zeros (the unconditional text) to both halves.
        return linear_denoise(x, sigma, jnp.zeros_like(text))

    cfg = sampling.SamplerConfig(steps=6, guidance=0.0, sampler=sampler)  # the lower bound
    key = jnp.asarray(NOISE)
    got = sampling.make_sampler(linear_denoise, cfg, SHAPE)(TEXT, key)
    # 0·c + 1·u == u exactly for finite c.
    np.testing.assert_array_equal(got, sampling.make_sampler(uncond_only, cfg, SHAPE)(TEXT, key))
