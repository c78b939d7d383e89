"""The Fréchet distance between two Gaussians, and the Gaussian statistics of a feature set.

Fréchet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al. 2017):

    d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)

S1 S2 is not symmetric, and scipy's sqrtm of it can return complex parts or fail when S1 is
singular (fewer samples than dimensions). Here tr (S1 S2)^(1/2) is the sum of square roots of
the eigenvalues of S1 S2, which are those of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2)
(AB and BA share eigenvalues); both square roots come from `eigh` in float64 with eigenvalues
at rounding level (< d eps max) set to 0. This is exact for singular covariances and needs no eps offset.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_vector(name: str, mu) -> np.ndarray:
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {mu.shape}")
    if not np.isfinite(mu).all():
        raise ValueError(f"{name} has non-finite entries")
    return mu


def _as_covariance(name: str, sigma, d: int) -> np.ndarray:
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if sigma.shape != (d, d):
        raise ValueError(f"{name} must be [{d}, {d}], got shape {sigma.shape}")
    if not np.isfinite(sigma).all():
        raise ValueError(f"{name} has non-finite entries")
    asym = np.abs(sigma - sigma.T).max()
    if asym > 1e-6 * max(1.0, np.abs(sigma).max()):
        raise ValueError(f"{name} must be symmetric, got max |S - S^T| = {asym:.3g}")
    return 0.5 * (sigma + sigma.T)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise set to 0: below d * eps * max |w| they are
    indistinguishable from 0, and their square roots (~1e-8) would otherwise add up."""
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2, via the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    return float(np.sqrt(_clip_eigenvalues(w)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    Covariances must be symmetric PSD (singular is fine); the result is >= 0 up to rounding."""
    mu1, mu2 = _as_vector("mu1", mu1), _as_vector("mu2", mu2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same length, got {mu1.shape[0]} and {mu2.shape[0]}")
    d = mu1.shape[0]
    sigma1, sigma2 = _as_covariance("sigma1", sigma1, d), _as_covariance("sigma2", sigma2, d)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # Rounding can leave a tiny negative value for identical Gaussians; a distance is >= 0.
    return float(max(value, 0.0))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of features [N, D] (N >= 2; unbiased covariance, as FID)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features have non-finite entries (did sampling diverge?)")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))
