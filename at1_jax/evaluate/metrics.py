"""Image-generation metrics on feature vectors: Fréchet distance (FID) and CLIP score.

Everything here is NumPy float64 on the host: FID differences of a few tenths matter, and
2048-d covariances accumulated in float32 over tens of thousands of images lose them.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


class RunningStats:
    """Mean and covariance of feature rows fed in batches (Chan et al.'s pairwise merge).

    Merging per-batch centred statistics avoids the cancellation of the textbook
    sum-of-squares form (E[xxᵀ] − μμᵀ) when the mean is large relative to the spread.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self.mean = np.zeros(self.dim, np.float64)
        self.m2 = np.zeros((self.dim, self.dim), np.float64)  # Σ (x − mean)(x − mean)ᵀ

    def update(self, features_ND) -> None:
        """Adds N feature rows of width dim."""
        x = np.asarray(features_ND, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {x.shape}")
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divides by n − 1, like np.cov and pytorch-fid)."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
        return self.m2 / (self.n - 1)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [dim], covariance [dim, dim]), float64."""
        return self.mean.copy(), self.covariance()


def feature_stats(features_ND) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of a feature matrix in one go."""
    stats = RunningStats(np.shape(features_ND)[1])
    stats.update(features_ND)
    return stats.stats()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), computed as pytorch-fid does.

    scipy's sqrtm of the (non-symmetric) product; if it is singular enough to give
    non-finite values, eps·I is added to both covariances. Rounding leaves imaginary parts of
    order 1e-10 on a real result; larger ones (> 1e-3 on the diagonal) mean the inputs are
    not covariance matrices, and raise.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        worst = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ1Σ2) has an imaginary component of {worst:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def gaussian_frechet_closed_form(mu1, var1, mu2, var2) -> float:
    """Fréchet distance of two Gaussians with diagonal covariances (exact, no sqrtm)."""
    mu1, var1, mu2, var2 = (np.asarray(a, np.float64) for a in (mu1, var1, mu2, var2))
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_scores(image_embeds_ND, text_embeds_ND) -> np.ndarray:
    """Per-pair CLIP score 100·max(cos(image_i, text_i), 0) (Hessel et al. 2021, w = 100)."""
    img = _unit(np.asarray(image_embeds_ND, np.float64))
    txt = _unit(np.asarray(text_embeds_ND, np.float64))
    if img.shape != txt.shape:
        raise ValueError(f"image embeds {img.shape} and text embeds {txt.shape} differ")
    return 100.0 * np.maximum((img * txt).sum(axis=-1), 0.0)


def clip_score(image_embeds_ND, text_embeds_ND) -> float:
    """Mean CLIP score over pairs.

    torchmetrics' CLIPScore documents this formula; its code clamps the mean of 100·cos rather
    than each term: the two agree whenever no pair has a negative cosine (the usual case for
    a trained CLIP), and this per-pair form is the published definition.
    """
    return float(clip_scores(image_embeds_ND, text_embeds_ND).mean())
