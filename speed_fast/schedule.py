"""Noise schedules of discrete DDPM-style diffusion, built once in float64.

Every table is a float64 CPU tensor of length T indexed by the 0-based time step
t = 0..T-1, so `alphas_cumprod[t]` is abar at step t+1 in the paper's 1-based
notation. Device copies for the training step are made once by the caller
(`speed_fast.ops.FusedSpeeD`), never per lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("linear", "quadratic", "cosine")

_LINEAR_DEFAULTS = (1e-4, 0.02)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _betas(kind: str, T: int, beta_start, beta_end, cosine_s: float, max_beta: float) -> np.ndarray:
    if kind in ("linear", "quadratic"):
        bs, be = _LINEAR_DEFAULTS
        bs = bs if beta_start is None else _check_finite("beta_start", beta_start)
        be = be if beta_end is None else _check_finite("beta_end", beta_end)
        if not 0.0 < bs < 1.0:
            raise ValueError(f"beta_start must be in (0, 1), got {bs!r}")
        if not 0.0 < be < 1.0:
            raise ValueError(f"beta_end must be in (0, 1), got {be!r}")
        if be < bs:
            raise ValueError(f"beta_end must be >= beta_start, got beta_start={bs!r}, beta_end={be!r}")
        if kind == "linear":
            return np.linspace(bs, be, T, dtype=np.float64)
        return np.linspace(bs**0.5, be**0.5, T, dtype=np.float64) ** 2
    # cosine (Nichol & Dhariwal 2021): betas follow from abar, beta_start/end do not apply.
    if beta_start is not None or beta_end is not None:
        raise ValueError(
            "the cosine schedule is defined by cosine_s and max_beta; "
            f"beta_start/beta_end must be left unset, got beta_start={beta_start!r}, beta_end={beta_end!r}"
        )
    if not 0.0 <= cosine_s < 1.0:
        raise ValueError(f"cosine_s must be in [0, 1), got {cosine_s!r}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta!r}")

    def abar(u):
        return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""

    kind: str
    T: int
    beta_start: float | None
    beta_end: float | None
    betas: torch.Tensor = field(repr=False)

    @classmethod
    def make(
        cls,
        kind: str = "linear",
        T: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        *,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> "NoiseSchedule":
        """Build a schedule. linear/quadratic default to DDPM's betas 1e-4..0.02."""
        if kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
        T = _check_positive_int("T", T, minimum=2)
        betas = _betas(kind, T, beta_start, beta_end, float(cosine_s), float(max_beta))
        if kind != "cosine":
            beta_start = float(betas[0])
            beta_end = float(betas[-1])
        return cls(kind=kind, T=T, beta_start=beta_start, beta_end=beta_end, betas=torch.from_numpy(betas))

    def __post_init__(self):
        b = self.betas
        if b.dtype != torch.float64 or b.ndim != 1 or b.numel() != self.T:
            raise ValueError(f"betas must be float64 of shape [{self.T}], got {b.dtype} {tuple(b.shape)}")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        # Derived tables are cached on the frozen instance.
        alphas = 1.0 - b
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        derived = {
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "snr": abar / (1.0 - abar),
            "posterior_variance": post_var,
            # posterior_variance[0] is 0; DiT/IDDPM clip the log with the next entry. A one-step
            # schedule (e.g. sampling respaced to 1 step) has none: beta_0 stands in (no noise is
            # added at t = 0, so the value only has to be finite).
            "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2] if self.T > 1 else b[:1], post_var[1:]])),
            "posterior_mean_coef1": b * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    # Declared for type checkers; set in __post_init__.
    alphas: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    alphas_cumprod_prev: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    sqrt_alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    sqrt_one_minus_alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    sqrt_recip_alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    sqrt_recipm1_alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    snr: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    posterior_variance: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    posterior_log_variance_clipped: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    posterior_mean_coef1: torch.Tensor = field(init=False, repr=False, compare=False, default=None)
    posterior_mean_coef2: torch.Tensor = field(init=False, repr=False, compare=False, default=None)

    def describe(self) -> dict:
        """The arguments that rebuild this schedule (for config.json)."""
        return {"kind": self.kind, "T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}
