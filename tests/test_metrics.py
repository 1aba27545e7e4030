"""Fréchet distance, running feature statistics and the CLIP-score formula against references."""

import numpy as np
import pytest

from at1_jax.evaluate.metrics import (
    RunningStats,
    clip_score,
    clip_scores,
    feature_stats,
    frechet_distance,
    gaussian_frechet_closed_form,
)


def _random_cov(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _frechet_eig(mu1, s1, mu2, s2):
    """Independent reference: Tr((Σ1Σ2)^½) = Σ √eig(Σ1^½ Σ2 Σ1^½), all symmetric eigensolves."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_frechet_distance_matches_eigen_reference():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d, 3.0)
        got = frechet_distance(mu1, s1, mu2, s2)
        want = _frechet_eig(mu1, s1, mu2, s2)
        # Both are float64 with condition numbers ~1e2-1e3: agreement to ~1e-9 relative.
        assert got == pytest.approx(want, rel=1e-8, abs=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 32)) * rng.uniform(0.5, 2.0, 32) + 3.0
    mu, sigma = feature_stats(feats)
    # Tr(Σ) ≈ 32·1.5²; sqrtm(Σ²) reproduces Σ to ~1e-12 relative, so |FID| < 1e-8.
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_two_gaussian_sets_matches_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 8, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    var1, var2 = np.ones(d), rng.uniform(0.25, 4.0, d)
    x1 = rng.standard_normal((n, d)) * np.sqrt(var1) + mu1
    x2 = rng.standard_normal((n, d)) * np.sqrt(var2) + mu2
    got = frechet_distance(*feature_stats(x1), *feature_stats(x2))
    want = gaussian_frechet_closed_form(mu1, var1, mu2, var2)
    # Sampling error: each mean and std estimate is off by ~σ/√n ≤ 0.0045 (σ ≤ 2); they enter
    # as 2·Δμ·ε and 2·(σ1 − σ2)·δσ per dimension, ~0.03 in all over d = 8 against want ≈ 3.7
    # (seen: 0.3% off). 2% is several standard errors, and the seed makes this a fixed check.
    assert got == pytest.approx(want, rel=0.02)
    # The closed form itself is exact for the population parameters.
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(
        want, rel=1e-10
    )


def test_running_stats_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(3)
    # A large offset relative to the spread: the naive E[xxᵀ] − μμᵀ form loses digits here.
    feats = rng.standard_normal((1003, 16)) * 0.01 + 1e3
    stats = RunningStats(16)
    for lo, hi in ((0, 1), (1, 400), (400, 400), (400, 1003)):
        stats.update(feats[lo:hi])
    mu, sigma = stats.stats()
    assert stats.n == 1003
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-14)
    # Entries ~1e-4; float64 centring keeps ~1e-9 of that after a 1e3 offset.
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-13)


def test_running_stats_errors():
    stats = RunningStats(4)
    with pytest.raises(ValueError, match=r"expected features \(N, 4\)"):
        stats.update(np.zeros((2, 3)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.covariance()


def test_frechet_distance_handles_singular_covariances():
    # Rank-deficient covariances (fewer samples than dimensions) make sqrtm near-singular.
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 1
    got = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(got) and got > 0
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_clip_score_formula():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = np.array([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    # cos = 1, −1 (clamped to 0), 1/√2.
    np.testing.assert_allclose(clip_scores(img, txt), [100.0, 0.0, 100 / np.sqrt(2)], rtol=1e-12)
    assert clip_score(img, txt) == pytest.approx((100 + 100 / np.sqrt(2)) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="differ"):
        clip_scores(img, txt[:2])
