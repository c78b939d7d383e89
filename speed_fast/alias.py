"""Vose's alias method: O(T) table build, O(1) per draw.

A draw takes a column c uniformly in [0, T) and a coin u in [0, 1):
t = c if u < prob[c] else alias[c]. The table is built in float64 and stored as
float32 thresholds; the float32 rounding moves each implied mass by at most
2^-24 / T, far below what any test of P(t) can see.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_probabilities(p) -> np.ndarray:
    if isinstance(p, torch.Tensor):
        p = p.detach().cpu().to(torch.float64).numpy()
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p must be a non-empty 1-D array, got shape {p.shape}")
    if p.size >= 2**31:
        raise ValueError(f"p has {p.size} entries; at most 2^31 - 1 are supported (int32 aliases)")
    if not np.all(np.isfinite(p)):
        bad = int(np.nonzero(~np.isfinite(p))[0][0])
        raise ValueError(f"p must be finite, got p[{bad}] = {p[bad]!r}")
    if np.any(p < 0):
        bad = int(np.nonzero(p < 0)[0][0])
        raise ValueError(f"p must be >= 0, got p[{bad}] = {p[bad]!r}")
    total = p.sum()
    if not total > 0:
        raise ValueError("p must have a positive sum, got all zeros")
    return p / total


def build_alias_table(p) -> tuple[torch.Tensor, torch.Tensor]:
    """Vose's alias table for the distribution proportional to p.

    Returns (prob float32 [T], alias int32 [T]). Columns without a partner keep
    probability 1 (the rounding leftovers of Vose's method)."""
    q = _as_probabilities(p)
    T = q.size
    q = q * T
    prob = np.ones(T, dtype=np.float64)
    alias = np.arange(T, dtype=np.int64)
    small = [i for i in range(T) if q[i] < 1.0]
    large = [i for i in range(T) if q[i] >= 1.0]
    while small and large:
        s = small.pop()
        g = large[-1]
        prob[s] = q[s]
        alias[s] = g
        q[g] = (q[g] + q[s]) - 1.0
        if q[g] < 1.0:
            large.pop()
            small.append(g)
    # Whatever is left (in either list) is 1 up to rounding.
    return torch.from_numpy(prob.astype(np.float32)), torch.from_numpy(alias.astype(np.int32))


def implied_probabilities(prob: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """float64 [T]: the distribution an alias table samples exactly,
    P(t) = (prob[t] + sum_{c: alias[c] = t} (1 - prob[c])) / T."""
    check_alias_table(prob, alias)
    p = prob.detach().cpu().to(torch.float64)
    a = alias.detach().cpu().to(torch.int64)
    out = p.clone()
    out.index_add_(0, a, 1.0 - p)
    return out / p.numel()


def check_alias_table(prob: torch.Tensor, alias: torch.Tensor) -> None:
    """Raise ValueError unless (prob, alias) is a well-formed table on one device."""
    if not isinstance(prob, torch.Tensor) or not isinstance(alias, torch.Tensor):
        raise ValueError(f"prob and alias must be tensors, got {type(prob).__name__} and {type(alias).__name__}")
    if prob.ndim != 1 or alias.ndim != 1:
        raise ValueError(f"prob and alias must be 1-D, got shapes {tuple(prob.shape)} and {tuple(alias.shape)}")
    if prob.numel() != alias.numel():
        raise ValueError(f"prob and alias must have the same length, got {prob.numel()} and {alias.numel()}")
    if prob.numel() == 0:
        raise ValueError("alias table is empty")
    if prob.dtype != torch.float32:
        raise ValueError(f"prob must be float32, got {prob.dtype}")
    if alias.dtype != torch.int32:
        raise ValueError(f"alias must be int32, got {alias.dtype}")
    if prob.device != alias.device:
        raise ValueError(f"prob and alias must be on one device, got {prob.device} and {alias.device}")
