"""Precision and recall by k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019), as ADM's
evaluator computes them on pool_3 features with k = 3.

* The manifold of a set is the union of balls around its points; a point's radius is its k-th
  smallest distance to the points of its own set, the point itself included (distance 0): with
  distinct points, the distance to its k-th nearest other point.
* precision = fraction of generated points inside the reference manifold (within the radius of
  at least one reference point); recall = fraction of reference points inside the generated
  manifold. A point on a ball's boundary is inside (<=).

Distances are squared Euclidean, |u|^2 - 2 u.v + |v|^2 clamped at 0 (ordering by squared distance
is ordering by distance), computed by blocks of rows on `device` (a GPU when given) in float32
after subtracting the reference mean from both sets (distances do not change, the rounding of the
expansion does). ADM computes the same expansion in float16 when every entry of a block is finite
(else float32), so a point within float16 rounding of a boundary can be counted differently there.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

ADM_K = 3
_BLOCK_BYTES = 1 << 28  # one block of distances, [rows, N] in the compute dtype


def _as_matrix(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be features [N, D], got shape {tuple(t.shape)}")
    return t


def _rows_per_block(n_cols: int, dtype: torch.dtype) -> int:
    return max(1, _BLOCK_BYTES // max(1, n_cols * torch.finfo(dtype).bits // 8))


def _sq_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] squared distances (b_sq = |b|^2 per row)."""
    a_sq = (a * a).sum(dim=1, keepdim=True)            # (n, 1)
    return (a_sq - 2.0 * (a @ b.T) + b_sq[None]).clamp_min_(0.0)


def manifold_radii(features, k: int = ADM_K, device=None, dtype=torch.float32) -> torch.Tensor:
    """[N] squared radii: each point's k-th smallest squared distance within the set, itself included."""
    k = operator.index(k)
    f = _as_matrix("features", features)
    if k < 1 or f.shape[0] < k + 1:
        raise ValueError(f"a k = {k} manifold needs at least k + 1 = {k + 1} points, got {f.shape[0]}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    f = f.to(device=device, dtype=dtype)
    f_sq = (f * f).sum(dim=1)
    rows = _rows_per_block(f.shape[0], dtype)
    out = [_sq_distances(f[s:s + rows], f, f_sq).kthvalue(k + 1, dim=1).values for s in range(0, f.shape[0], rows)]
    return torch.cat(out)


def _inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """[len(points)] bool: within radii[j] of some centers[j]."""
    c_sq = (centers * centers).sum(dim=1)
    rows = _rows_per_block(centers.shape[0], points.dtype)
    return torch.cat([(_sq_distances(points[s:s + rows], centers, c_sq) <= radii[None]).any(dim=1)
                      for s in range(0, points.shape[0], rows)])


def precision_recall(reference, generated, k: int = ADM_K, device=None, dtype=torch.float32) -> tuple[float, float]:
    """(precision, recall) of `generated` against `reference` features [N, D] (see the module docstring)."""
    ref, gen = _as_matrix("reference features", reference), _as_matrix("generated features", generated)
    if ref.shape[1] != gen.shape[1]:
        raise ValueError(f"reference and generated features differ in size: {ref.shape[1]} and {gen.shape[1]}")
    for name, f in (("reference", ref), ("generated", gen)):
        if f.shape[0] < k + 1:
            raise ValueError(f"precision/recall with k = {k} need at least {k + 1} {name} samples, got {f.shape[0]}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name} features have non-finite entries")
    device = torch.device(device) if device is not None else torch.device("cpu")
    center = ref.to(torch.float64).mean(dim=0)
    ref = (ref.to(device=device, dtype=torch.float64) - center.to(device)).to(dtype)
    gen = (gen.to(device=device, dtype=torch.float64) - center.to(device)).to(dtype)
    r_ref = manifold_radii(ref, k, device, dtype)
    r_gen = manifold_radii(gen, k, device, dtype)
    precision = _inside(gen, ref, r_ref).double().mean().item()
    recall = _inside(ref, gen, r_gen).double().mean().item()
    return precision, recall
