"""Tests for the training objective in at1_jax/diffusion.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at1_jax.model import objective as diffusion


@pytest.mark.parametrize(("a", "b"), [(0.75, 0.75), (1.0, 2.5)])
def test_sample_sigma_matches_beta_moments(a, b):
    n = 200_000
    sigma = diffusion.sample_sigma(jax.random.key(0), n, a, b)
    assert sigma.shape == (n, 1) and sigma.dtype == jnp.float32
    s = np.asarray(sigma, np.float64)
    assert s.min() > 0 and s.max() < 1

    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    # Standard errors: SE(mean) = sqrt(var/n). For the sample variance, Var((X−mu)^2) <=
    # E[(X−mu)^4] <= var·max(X−mu)^2 <= var since |X−mu| < 1, so SE(var) <= sqrt(var/n).
    # 5 standard errors: a false alarm has probability < 1e-6 per check.
    se = np.sqrt(var / n)
    assert abs(s.mean() - mean) < 5 * se
    assert abs(s.var() - var) < 5 * se


def test_sample_sigma_is_clipped_into_open_interval():
    # Beta(0.05, 0.05) puts most mass near the ends, so float32 draws hit exactly 0 and 1.
    # Same shape as the moments test so the compiled sampler is reused.
    raw = jax.random.beta(jax.random.key(1), 0.05, 0.05, (200_000, 1), dtype=jnp.float32)
    assert (raw == 0).any() and (raw == 1).any()
    sigma = diffusion.sample_sigma(jax.random.key(1), 200_000, 0.05, 0.05)
    assert float(sigma.min()) == np.float32(diffusion.SIGMA_EPS)
    assert float(sigma.max()) == np.float32(1 - diffusion.SIGMA_EPS)
    assert float(sigma.max()) < 1.0


def test_add_noise_endpoints_and_broadcast():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 4, 8, 8)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(3, 4, 8, 8)), jnp.float32)
    # sigma = 0 and 1 are exact: 0·eps + 1·x and 1·eps + 0·x round to nothing.
    np.testing.assert_array_equal(diffusion.add_noise(x, jnp.zeros((3, 1)), eps), x)
    np.testing.assert_array_equal(diffusion.add_noise(x, jnp.ones((3, 1)), eps), eps)
    # sigma -> 0 approaches x: the error is sigma·|eps − x| <= 1e-7·~10, plus float32 rounding.
    near = diffusion.add_noise(x, jnp.full((3, 1), 1e-7), eps)
    np.testing.assert_allclose(near, x, atol=2e-6)
    # One sigma per sample, broadcast over C, H, W.
    sigma = jnp.array([[0.1], [0.5], [0.9]])
    out = np.asarray(diffusion.add_noise(x, sigma, eps))
    for i, s in enumerate([0.1, 0.5, 0.9]):
        want = s * np.asarray(eps[i], np.float64) + (1 - s) * np.asarray(x[i], np.float64)
        np.testing.assert_allclose(out[i], want, rtol=1e-6, atol=1e-6)


def test_drop_text_rate_and_rows():
    b, d, p = 20_000, 8, 0.15
    # Shift away from zero so no input row is all zeros by chance.
    text = jnp.asarray(np.random.default_rng(3).normal(size=(b, d)) + 3.0, jnp.float32)
    out = np.asarray(diffusion.drop_text(jax.random.key(4), text, p))
    dropped = (out == 0).all(axis=1)
    # Binomial(b, p): std = sqrt(b·p·(1−p)) ~ 50 rows; allow 5 std.
    assert abs(dropped.sum() - b * p) < 5 * np.sqrt(b * p * (1 - p))
    np.testing.assert_array_equal(out[~dropped], np.asarray(text)[~dropped])
    assert (out[dropped] == 0).all()
    np.testing.assert_array_equal(diffusion.drop_text(jax.random.key(4), text, 0.0), text)
    assert (diffusion.drop_text(jax.random.key(4), text, 1.0) == 0).all()


def test_drop_text_keeps_dtype():
    text = jnp.ones((16, 4), jnp.float16)
    assert diffusion.drop_text(jax.random.key(0), text, 0.5).dtype == jnp.float16


def test_x0_loss_is_float32_and_matches_numpy():
    rng = np.random.default_rng(5)
    pred = jnp.asarray(rng.normal(size=(4, 4, 16, 16)), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(4, 4, 16, 16)), jnp.bfloat16)
    loss = diffusion.x0_loss(pred, x)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    want = np.mean(
        (np.asarray(pred, np.float64) - np.asarray(x, np.float64)) ** 2, dtype=np.float64
    )
    # The bf16 values are exact in float32 and their difference is too (or rounds once);
    # summing 4096 fp32 squares costs at most ~log2(4096)·6e-8 relative.
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_x0_loss_fp16_does_not_overflow():
    # A difference of 300 squares to 9e4 > fp16 max (65504): an fp16 loss would be inf.
    pred = jnp.full((2, 4), 300.0, jnp.float16)
    x = jnp.zeros((2, 4), jnp.float16)
    assert float(diffusion.x0_loss(pred, x)) == 90_000.0


def test_ema_update_numbers_and_dtypes():
    ema = {"w": jnp.array([1.0, 2.0]), "sub": {"b": jnp.array([4.0], jnp.bfloat16)}, "n": 3}
    params = {"w": jnp.array([3.0, 4.0]), "sub": {"b": jnp.array([8.0], jnp.float32)}, "n": 7}
    out = diffusion.ema_update(ema, params, 0.9)
    assert jax.tree.structure(out) == jax.tree.structure(ema)
    # 0.9·1 + 0.1·3 = 1.2, 0.9·2 + 0.1·4 = 2.2 (fp32 rounding only).
    np.testing.assert_allclose(out["w"], [1.2, 2.2], rtol=1e-6)
    assert out["w"].dtype == jnp.float32
    # 0.9·4 + 0.1·8 = 4.4, rounded once to bf16 (8 mantissa bits: 4.40625).
    assert out["sub"]["b"].dtype == jnp.bfloat16
    assert float(out["sub"]["b"][0]) == float(jnp.bfloat16(4.4))
    assert int(out["n"]) == 7  # non-float leaves follow params


def test_ema_update_bf16_averages_in_fp32():
    # In bf16 arithmetic decay 0.999 itself rounds to 1.0 and the EMA would never move; the
    # average must be taken in fp32 and rounded to bf16 once.
    ema = jnp.array([1.0, -3.0], jnp.bfloat16)
    new = jnp.array([200.0, 5.0], jnp.bfloat16)
    out = diffusion.ema_update(ema, new, 0.999)
    want = np.array([1.0, -3.0]) * 0.999 + 0.001 * np.array([200.0, 5.0])  # 1.199, -2.992
    want_bf16 = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float32)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), want_bf16)
    assert float(out[0]) != 1.0


def test_training_targets_consistent():
    b, d = 4096, 8
    rng = np.random.default_rng(6)
    kk = jax.random.key(6)
    x = jnp.asarray(rng.normal(size=(b, 4, 2, 2)), jnp.float16)
    text = jnp.asarray(rng.normal(size=(b, d)) + 3.0, jnp.float32)
    cfg = diffusion.ObjectiveConfig()
    targets = jax.jit(diffusion.training_targets, static_argnums=3)
    out = targets(kk, x, text, cfg)
    x_noisy, sigma, text_out = out
    assert x_noisy.shape == x.shape and x_noisy.dtype == jnp.float32
    assert sigma.shape == (b, 1) and bool((sigma > 0).all() & (sigma < 1).all())
    # Same key, same draws.
    again = targets(kk, x, text, cfg)
    np.testing.assert_array_equal(again.x_noisy, x_noisy)
    # The implied noise eps = (x_noisy − (1−sigma)·x)/sigma is standard normal and independent
    # of sigma (separate keys by purpose). Samples with sigma < 0.05 are skipped: dividing by
    # a small sigma amplifies float32 rounding. ~3.9k·4·4 = 60k values: the mean's SE is 0.004.
    keep = np.asarray(sigma)[:, 0] > 0.05
    s = np.asarray(sigma, np.float64)[keep][:, :, None, None]
    xn = np.asarray(x_noisy, np.float64)[keep]
    eps = (xn - (1 - s) * np.asarray(x, np.float64)[keep]) / s
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03
    # Text rows are either untouched or zero, at about the 15% rate (binomial std ~ 23 rows).
    t = np.asarray(text_out)
    dropped = (t == 0).all(axis=1)
    np.testing.assert_array_equal(t[~dropped], np.asarray(text)[~dropped])
    assert abs(dropped.sum() - 0.15 * b) < 5 * np.sqrt(b * 0.15 * 0.85)


def test_objective_config_validation():
    assert diffusion.TLD_OBJECTIVE.beta_b == 2.5
    with pytest.raises(ValueError, match=r"beta_a.*-1"):
        diffusion.ObjectiveConfig(beta_a=-1)
    with pytest.raises(ValueError, match=r"cfg_drop.*1\.5"):
        diffusion.ObjectiveConfig(cfg_drop=1.5)
