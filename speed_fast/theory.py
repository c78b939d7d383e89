"""SpeeD's theory of process increments (paper Sec. 2.2-2.5, Theorem 1, Table 1).

The process increment delta_t = x_{t+1} - x_t, with x_t and x_{t+1} drawn from
their marginals q(x_t | x_0), is Gaussian with mean phi_t x_0 and variance
Psi_t I (Theorem 1):

    phi_t = (sqrt(alpha_{t+1}) - 1) sqrt(abar_t),   Psi_t = 2 - abar_t (1 + alpha_{t+1}).

Its variance rises fastest at t_acc-dec (acceleration -> deceleration) and
saturates in the convergence area t >= tau, where tau is where the magnitude
r_t = exp{(beta_0 + Delta_beta t / 2T) t} (a lower bound of 1/abar_t) reaches r.

Everything here is float64 numpy/torch on the CPU; it runs once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import NoiseSchedule

# The paper's default tau = 700 on the DDPM linear schedule corresponds to r ~ 140.
DEFAULT_MAGNITUDE = 140.0

AREAS = ("acceleration", "deceleration", "convergence")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float64)


def increment_mean_coef(s: NoiseSchedule) -> np.ndarray:
    """phi_t = (sqrt(alpha_{t+1}) - 1) sqrt(abar_t), t = 0..T-2 (float64 [T-1])."""
    a, ab = _np(s.alphas), _np(s.alphas_cumprod)
    return (np.sqrt(a[1:]) - 1.0) * np.sqrt(ab[:-1])


def increment_variance(s: NoiseSchedule) -> np.ndarray:
    """Psi_t = 2 - abar_t (1 + alpha_{t+1}), t = 0..T-2 (float64 [T-1])."""
    a, ab = _np(s.alphas), _np(s.alphas_cumprod)
    return 2.0 - ab[:-1] * (1.0 + a[1:])


def _linear_params(T: int, beta_start: float, beta_end: float) -> tuple[float, float]:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 2:
        raise ValueError(f"T must be an integer >= 2, got {T!r}")
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (isinstance(v, (int, float, np.floating)) and 0.0 < float(v) < 1.0):
            raise ValueError(f"{name} must be in (0, 1), got {v!r}")
    if beta_end <= beta_start:
        raise ValueError(
            f"Theorem 1 needs an increasing linear schedule, got beta_start={beta_start!r} >= beta_end={beta_end!r}"
        )
    return float(beta_start), float(beta_end) - float(beta_start)


def magnitude_lower_bound(T: int, beta_start: float, beta_end: float, t) -> np.ndarray:
    """r_t = exp{(beta_0 + Delta_beta t / 2T) t}: Lemma 1's lower bound of 1/abar_t."""
    b0, db = _linear_params(T, beta_start, beta_end)
    t = np.asarray(t, dtype=np.float64)
    return np.exp((b0 + db * t / (2 * T)) * t)


def increment_bounds(s: NoiseSchedule) -> dict[str, np.ndarray]:
    """Theorem 1's bounds on [0, T): xi_t (so ||phi_t||^2 <= xi_t ||E x0||^2) and the
    lower bound of Psi_t, 2 - 2 exp{-(beta_0 + Delta_beta t / 2T) t}, with its t-derivative."""
    if s.kind != "linear":
        raise ValueError(f"Theorem 1's bounds are stated for the linear schedule, got {s.kind!r}")
    b0, db = _linear_params(s.T, s.beta_start, s.beta_end)
    t = np.arange(s.T, dtype=np.float64)
    decay = np.exp(-(b0 + db * t / (2 * s.T)) * t)
    return {
        "t": t,
        "mean_upper": (b0 + db) * decay,
        "var_lower": 2.0 - 2.0 * decay,
        "var_lower_rate": 2.0 * (b0 + db * t / s.T) * decay,
    }


def tau_from_magnitude(T: int, beta_start: float, beta_end: float, r: float) -> float:
    """Theorem 1's threshold: the t at which r_t reaches r (paper Sec. 2.5),

        tau = sqrt(2 T log r / Delta_beta + T^2 beta_0^2 / Delta_beta^2) - T beta_0 / Delta_beta.

    Returned as a float; the smallest integer time step in the convergence area is ceil(tau).
    """
    b0, db = _linear_params(T, beta_start, beta_end)
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)) or not float(r) > 1.0:
        raise ValueError(f"magnitude r must be a real number > 1, got {r!r}")
    if not math.isfinite(float(r)):
        raise ValueError(f"magnitude r must be finite, got {r!r}")
    return math.sqrt(2 * T * math.log(r) / db + (T * b0 / db) ** 2) - T * b0 / db


def tau_for_schedule(s: NoiseSchedule, r: float = DEFAULT_MAGNITUDE) -> int:
    """Integer tau for any schedule: Theorem 1's closed form on the linear schedule, and on
    others the first t where the exact magnitude 1/abar_t reaches r (the quantity the
    closed form bounds). Clamped to no value: an r beyond the schedule's end raises."""
    if s.kind == "linear":
        tau = math.ceil(tau_from_magnitude(s.T, s.beta_start, s.beta_end, r))
    else:
        if not (isinstance(r, (int, float, np.floating, np.integer)) and math.isfinite(float(r)) and float(r) > 1.0):
            raise ValueError(f"magnitude r must be a finite real number > 1, got {r!r}")
        reached = np.nonzero(-np.log(_np(s.alphas_cumprod)) >= math.log(r))[0]
        tau = int(reached[0]) if reached.size else s.T + 1
    if not 0 < tau <= s.T:
        raise ValueError(f"magnitude r={r!r} puts tau at {tau}, outside (0, T={s.T}] for this schedule")
    return tau


def acceleration_peak(s: NoiseSchedule) -> int:
    """t_acc-dec: argmax over t of the finite-difference d/dt Psi_t (218 for DDPM's linear schedule)."""
    return int(np.argmax(np.gradient(increment_variance(s))))


def acceleration_peak_bound(s: NoiseSchedule) -> float:
    """The closed-form peak of the lower bound's rate: beta_{t_acc} = sqrt(Delta_beta / T)."""
    b0, db = _linear_params(s.T, s.beta_start, s.beta_end)
    return s.T * (math.sqrt(db / s.T) - b0) / db


def area_boundaries(s: NoiseSchedule, tau: int | None = None) -> tuple[int, int]:
    """(t_acc-dec, tau). Without a tau, SpeeD's default tau for this schedule is used so that
    runs with any strategy split their losses the same way."""
    tau = tau_for_schedule(s) if tau is None else int(tau)
    if not 0 < tau <= s.T:
        raise ValueError(f"tau must be in (0, T={s.T}], got {tau!r}")
    return acceleration_peak(s), tau


def area_index(s: NoiseSchedule, tau: int | None = None) -> torch.Tensor:
    """int64 [T]: 0 acceleration (t < t_acc-dec), 1 deceleration (t_acc-dec <= t < tau), 2 convergence
    (t >= tau). When t_acc-dec >= tau (small T) the deceleration area is empty."""
    peak, tau = area_boundaries(s, tau)
    t = torch.arange(s.T)
    return (t >= min(peak, tau)).long() + (t >= tau).long()


# ---------------------------------------------------------------------------
# Generalised s-sigma process increments (paper Sec. 2.3, Table 1)
# ---------------------------------------------------------------------------

SDE_KINDS = ("vp", "ve", "edm")


@dataclass(frozen=True)
class SigmaSchedule:
    """x_t = s(t) x_0 + s(t) sigma(t) eps, continuous t. Table 1 of the paper:

    VP:  s = exp(-Delta_beta t^2 / 4 - beta_0 t / 2),  sigma^2 = exp(Delta_beta t^2 / 2 + beta_0 t) - 1
    VE:  s = 1,  sigma^2 = t
    EDM: s = 1,  sigma^2 = t^2
    """

    kind: str
    beta_0: float = 0.1
    beta_1: float = 20.0

    def __post_init__(self):
        if self.kind not in SDE_KINDS:
            raise ValueError(f"SDE kind must be one of {SDE_KINDS}, got {self.kind!r}")
        if self.kind == "vp" and not (0.0 <= self.beta_0 < self.beta_1):
            raise ValueError(f"VP needs 0 <= beta_0 < beta_1, got beta_0={self.beta_0!r}, beta_1={self.beta_1!r}")

    def s(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp":
            db = self.beta_1 - self.beta_0
            return np.exp(-0.25 * db * t**2 - 0.5 * self.beta_0 * t)
        return np.ones_like(t)

    def sigma2(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp":
            db = self.beta_1 - self.beta_0
            return np.expm1(0.5 * db * t**2 + self.beta_0 * t)
        return t if self.kind == "ve" else t**2

    def ds(self, t: np.ndarray) -> np.ndarray:
        """ds/dt (Table 1's s-dot)."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp":
            db = self.beta_1 - self.beta_0
            return -0.5 * (db * t + self.beta_0) * self.s(t)
        return np.zeros_like(t)

    def dsigma2(self, t: np.ndarray) -> np.ndarray:
        """d sigma^2 / dt (Table 1's last column)."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "vp":
            db = self.beta_1 - self.beta_0
            return (db * t + self.beta_0) * np.exp(0.5 * db * t**2 + self.beta_0 * t)
        return np.ones_like(t) if self.kind == "ve" else 2.0 * t

    def increment(self, t: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        """(A_t, Sigma_t) of delta ~ N(A x_0, Sigma I) between t and t + dt:
        A = s(t+dt) - s(t), Sigma = s(t+dt)^2 sigma(t+dt)^2 + s(t)^2 sigma(t)^2."""
        if not (isinstance(dt, (int, float)) and dt > 0):
            raise ValueError(f"dt must be a positive number, got {dt!r}")
        t = np.asarray(t, dtype=np.float64)
        t2 = t + dt
        a = self.s(t2) - self.s(t)
        var = self.s(t2) ** 2 * self.sigma2(t2) + self.s(t) ** 2 * self.sigma2(t)
        return a, var
