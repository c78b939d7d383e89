"""Feature extractors (images [N, C, H, W] in [-1, 1], or latents -> float64 [N, D]) and the
Fréchet distance of two sets under one of them.

* `RawFeatures`: the flattened data itself (pixels or latents), for small sets such as the
  digits default (64 dims). Above `max_dim` dims the data are projected on a fixed random
  Gaussian matrix (seeded, [D, max_dim], scaled 1/sqrt(max_dim)) so the covariance stays
  well-estimated from a few hundred samples; the metric is then "Fréchet distance of raw data
  under a fixed random projection", comparable only between runs using the same projection.
  The key is "fd_raw".
* `InceptionFeatures` (speed_fast.evaluation.inception): FID's 2048-d Inception features; the key is "fid".
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from .frechet import frechet_distance, gaussian_stats
from .inception import InceptionFeatures


PROJECTION_CACHE_BYTES = 1 << 30  # a larger random projection is drawn block by block, never held whole
STREAM_BLOCK_BYTES = 1 << 26


class RawFeatures:
    """Flattened data, randomly projected to `max_dim` dims when larger (see the module docstring)."""

    key = "fd_raw"

    def __init__(self, max_dim: int = 512, seed: int = 0):
        max_dim = operator.index(max_dim)
        if max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {max_dim}")
        self.max_dim, self.seed = max_dim, operator.index(seed)
        self._proj: torch.Tensor | None = None

    def projection(self, dim: int) -> torch.Tensor | None:
        """The fixed [dim, max_dim] projection (None when dim <= max_dim)."""
        if dim <= self.max_dim:
            return None
        if self._proj is None or self._proj.shape[0] != dim:
            g = torch.Generator().manual_seed(self.seed)
            self._proj = torch.randn(dim, self.max_dim, generator=g, dtype=torch.float64) / math.sqrt(self.max_dim)
        return self._proj

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.detach().cpu().double().reshape(images.shape[0], -1)  # (N, D)
        dim = flat.shape[1]
        if dim > self.max_dim and dim * self.max_dim * 8 > PROJECTION_CACHE_BYTES:
            return self._streamed(flat)
        proj = self.projection(dim)
        return flat if proj is None else flat @ proj

    def _streamed(self, flat: torch.Tensor) -> torch.Tensor:
        """flat @ projection(D) without holding the [D, max_dim] matrix (3x1024x1024 images would need
        12.9 GB): its rows are drawn block by block from the same generator, which gives the same
        matrix (blocks of a multiple of 16 rows: torch's CPU normal_fill works in groups of 16)."""
        dim = flat.shape[1]
        rows = max(16, (STREAM_BLOCK_BYTES // (self.max_dim * 8)) // 16 * 16)
        g = torch.Generator().manual_seed(self.seed)
        out = torch.zeros(flat.shape[0], self.max_dim, dtype=torch.float64)  # (N, max_dim)
        for s in range(0, dim, rows):
            block = torch.randn(min(rows, dim - s), self.max_dim, generator=g, dtype=torch.float64)
            out += flat[:, s:s + rows] @ (block / math.sqrt(self.max_dim))
        return out


def make_features(kind: str = "raw", *, inception_path=None, device="cpu", max_dim: int = 512, seed: int = 0):
    """"raw" -> RawFeatures(max_dim, seed); "inception" -> InceptionFeatures(inception_path, device)."""
    if kind == "raw":
        return RawFeatures(max_dim=max_dim, seed=seed)
    if kind == "inception":
        return InceptionFeatures(inception_path, device=device)
    raise ValueError(f"features must be 'raw' or 'inception', got {kind!r}")


def features_of(data, features, batch_size: int = 1024) -> torch.Tensor:
    """features(data) for data [N, C, H, W] (tensor or array), computed in batches: float64 [N, D]."""
    data = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    return torch.cat([features(data[s:s + batch_size]) for s in range(0, data.shape[0], batch_size)])


def feature_stats(data, features, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features(data) for data [N, C, H, W] (tensor or array), computed in batches."""
    return gaussian_stats(features_of(data, features, batch_size))


def frechet_between(generated, reference, features=None) -> float:
    """Fréchet distance between two sets of images/latents [N, C, H, W] under `features` (default raw)."""
    features = RawFeatures() if features is None else features
    return frechet_distance(*feature_stats(generated, features), *feature_stats(reference, features))
