"""Argument checks of the fused ops, shared by every op file and `FusedSpeeD`.

Each raises ValueError naming the argument, the bad value and what was expected. They only
look at metadata (dtype, shape, device), except `check_t` and `check_finite_table`, which read
values and therefore synchronise a GPU: the functional ops call them per call, `FusedSpeeD`
once at construction (its per-step calls stay free of device synchronisation).
"""

from __future__ import annotations

import torch

from ..alias import check_alias_table
from ..layout import FLOAT_DTYPES, samples_contiguous
from ..rng import check_seed_step, check_step_offset

__all__ = ["FLOAT_DTYPES", "check_alias_table", "check_batch", "check_finite_table", "check_n", "check_on",
           "check_seed_step", "check_step_offset", "check_t", "check_table", "samples_contiguous"]


def check_n(n) -> int:
    """A draw count: a non-negative integer (not a bool)."""
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise ValueError(f"n must be an integer, got {n!r}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def check_batch(name: str, x) -> torch.Tensor:
    """A float batch [B, ...] of any layout (the backends handle strides)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be a batch [B, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def check_on(name: str, x: torch.Tensor, device) -> None:
    if x.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {x.device}")


def check_table(name: str, v, T: int | None, device) -> None:
    """A float32 1-D per-time-step table (of length T when given) on `device`."""
    if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.dtype != torch.float32:
        got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a float32 1-D tensor, got {got}")
    if T is not None and v.numel() != T:
        raise ValueError(f"{name} must have length T={T}, got {v.numel()}")
    check_on(name, v, device)


def check_t(t, B: int, T: int, device) -> None:
    """Time steps: int64 [B] on `device`, every value in [0, T) (reads the values: synchronises)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (B,):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be an int64 tensor of shape ({B},), got {got}")
    check_on("t", t, device)
    if B and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"t must lie in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")


def check_finite_table(name: str, v: torch.Tensor) -> None:
    """Every entry finite (reads the values: synchronises)."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(v[i])}")
