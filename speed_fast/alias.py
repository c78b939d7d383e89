"""Vose's alias method: O(T) table build, O(1) per draw.

A draw takes a column c uniformly in [0, T) and a coin u in [0, 1):
t = c if u < prob[c] else alias[c]. The table is built in float64 and stored as
float32 thresholds; the float32 rounding moves each implied mass by at most
2^-24 / T, far below what any test of P(t) can see.

`build_alias_table_device` builds a table for the same P with torch ops on P's own device, with
no host synchronisation (the adaptive strategies rebuild their table during training). It pairs
columns differently from Vose's loop (a sweep written as prefix sums and binary searches), so
its table differs from `build_alias_table`'s while implying the same distribution.
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


def build_alias_table_device(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An alias table of the distribution proportional to p (float64 [T], >= 0, positive sum), built
    on p's device with fixed-shape torch ops: no value check and no read-back, so a CUDA stream never
    waits for the host. Deterministic (the same p gives the same table, bit for bit, on one device).

    The sweep (Hübschle-Schneider and Sanders, "Parallel weighted random sampling", 2022): with
    q = T p / sum(p), light items (q < 1) in index order have deficits d = 1 - q with prefix sums D,
    heavy items (q >= 1) in index order have excesses e = q - 1 with prefix sums E. Light i is
    filled from the first heavy k with E_k >= D_{i-1} (its chunk fits in what that heavy has left);
    heavy k runs below 1 after the first light with D_i > E_k, keeps w_k = E_k + 1 - D_i in its own
    column and takes the rest from heavy k + 1. Items the sweep never reaches (the last heavy, and
    rounding leftovers) keep probability 1, as in Vose's method. O(T log T) work: two stable
    sorts, two binary searches."""
    T = p.numel()
    dev = p.device
    q = p.to(torch.float64) * (T / p.to(torch.float64).sum())  # (T,) mean 1
    heavy = q >= 1.0
    idx = torch.arange(T, device=dev)
    heavies_first = torch.argsort((~heavy).to(torch.int32), stable=True)  # (T,) heavy items, then light ones
    lights_first = torch.argsort(heavy.to(torch.int32), stable=True)
    n_heavy = heavy.sum()  # device scalar
    n_light = T - n_heavy
    deficit = torch.where(heavy, 0.0, 1.0 - q)
    excess = torch.where(heavy, q - 1.0, 0.0)
    D = torch.cumsum(deficit, 0)  # at a light item: D_i (inclusive)
    E = torch.cumsum(excess, 0)  # at a heavy item: E_k (inclusive)
    inf = torch.full((T,), float("inf"), dtype=torch.float64, device=dev)
    E_heavy = torch.where(idx < n_heavy, E[heavies_first], inf)  # (T,) non-decreasing, padded
    D_light = torch.where(idx < n_light, D[lights_first], inf)
    last = T - 1
    # Light items: served by heavy m = #{k: E_k < D_{i-1}}. D_{i-1} is taken from D_light itself (the
    # previous light's prefix sum), not recomputed as D_i - d_i: the heavies' search below compares the
    # same floats, so a tie (a light starting exactly where a heavy's excess ends, as in SpeeD's
    # two-level P) is decided the same way by both and no mass is lost or counted twice.
    light_rank = (torch.cumsum((~heavy).to(torch.int64), 0) - 1).clamp(min=0)  # (T,) order among lights
    D_prev = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), D_light[:-1]])[light_rank]
    m = torch.searchsorted(E_heavy, D_prev, right=False)
    light_served = m < n_heavy
    light_alias = heavies_first[m.clamp(max=last)]
    # Heavy items: k-th heavy (0-based) runs below 1 after light i_k = #{lights: D_i <= E_k}.
    k = torch.cumsum(heavy.to(torch.int64), 0) - 1
    i_k = torch.searchsorted(D_light, E, right=True)
    runs_out = (i_k < n_light) & (k + 1 < n_heavy)
    keep = (E + 1.0 - D_light[i_k.clamp(max=last)]).clamp(0.0, 1.0)
    heavy_alias = heavies_first[(k + 1).clamp(max=last)]
    prob = torch.where(heavy, torch.where(runs_out, keep, 1.0), torch.where(light_served, q, 1.0))
    alias = torch.where(heavy, torch.where(runs_out, heavy_alias, idx), torch.where(light_served, light_alias, idx))
    return prob.to(torch.float32), alias.to(torch.int32)


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
