"""Time-step strategies: the sampling distribution P(t) and the loss weight w(t).

Each strategy is defined once here, in float64 (see docs/CONTRACT.md for the
formulas). The fused step (`speed_fast.ops.FusedSpeeD`) turns P into an alias
table and w into a device vector once per run (or once per change of P, for
strategies whose P depends on the training step). An adaptive strategy
(`loss_moment`, `adaptive_speed`) learns P from the run's losses: its statistics
live on the training device (`speed_fast.adaptive`) and its formulas here.

Two defects of the reference implementation are deliberately not reproduced:
its Min-SNR weights were 5x P2's (a numpy `.min(axis=1)[0]` that returned a
scalar) and its CLTS mixture went negative past its ramp (operator precedence).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from . import theory
from .schedule import NoiseSchedule

STRATEGIES = ("uniform", "speed", "p2", "min_snr", "lognormal", "clts", "loss_moment", "adaptive_speed")

# Every strategy parameter and its type, across strategies (command-line flags are built from it;
# make_strategy rejects the ones a strategy does not take). `dual` is SpeeD's one flag.
STRATEGY_PARAMS = {"k": float, "tau": int, "r": float, "lam": float, "weighting": str, "gamma": float,
                   "p_mean": float, "p_std": float, "mu": float, "sigma": float, "ramp_steps": int,
                   "bins": int, "history": int, "floor": float, "update_every": int,
                   "k_min": float, "k_max": float, "tau_min": int, "tau_max": int}

#: SpeeD's change-aware weighting rules. "official": the authors' code (w rescales d/dt Psi into
#: [1 - lam, lam] below tau, w = 1 from tau on; what produced the paper's tables). "paper": the rule
#: as Sec. 2.6 states it, the same rescaling over all t (no special case at tau). "none": w = 1
#: (asymmetric sampling alone, for ablations).
SPEED_WEIGHTINGS = ("official", "paper", "none")


def _real(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lb = "-inf" if lo is None else f"{lo}"
        ub = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo_open or lo is None else '['}{lb}, {ub}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def _integer(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {'inf' if hi is None else hi}], got {value!r}")
    return v


def _np(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float64)


class TimestepStrategy:
    """Base class. Subclasses set `weights` (float64 [T]) and implement `_probs(step)`."""

    name = "base"
    #: True when P(t) changes with the training step (the alias table must follow it).
    step_dependent = False
    #: The SpeeD threshold, when the strategy has one; areas use SpeeD's default otherwise.
    tau: int | None = None
    #: True when P(t) (and possibly w) follow the run's own losses: the fused step keeps the
    #: statistics and rebuilds the tables on the device (`speed_fast.adaptive`); `probs` is then the
    #: distribution the run starts from.
    adaptive = False

    def __init__(self, schedule: NoiseSchedule):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.T = schedule.T
        self.weights = torch.ones(self.T, dtype=torch.float64)

    def probs(self, step: int = 0) -> torch.Tensor:
        """float64 [T], >= 0, sums to 1: P(t) at this training step."""
        step = _integer("step", step, 0)
        p = self._probs(step)
        return p / p.sum()

    def _probs(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def probs_key(self, step: int):
        """A value that changes exactly when P(t) changes between steps (for table caches)."""
        return 0

    def params(self) -> dict:
        """The arguments that rebuild this strategy with make_strategy (for config.json)."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, **self.params()}

    def area_tau(self) -> int:
        """The tau that splits this strategy's per-area losses (its own, or SpeeD's default)."""
        return self.tau if self.tau is not None else theory.tau_for_schedule(self.schedule)

    def draws_needed(self, n: int) -> int:
        """How many alias draws a batch of n time steps consumes."""
        return n

    def postprocess(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Map the draws_needed(n) alias draws to the batch's n time steps (identity unless dual)."""
        return t

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Uniform(TimestepStrategy):
    name = "uniform"

    def _probs(self, step):
        return torch.ones(self.T, dtype=torch.float64)


class SpeeD(TimestepStrategy):
    """Asymmetric sampling (k times more mass below tau) and change-aware weighting."""

    name = "speed"

    def __init__(self, schedule, k: float = 5.0, tau: int | None = None, lam: float = 0.6,
                 r: float | None = None, dual: bool = False, weighting: str = "official"):
        super().__init__(schedule)
        self.k = _real("k", k, lo=1.0)
        self.lam = _real("lam", lam, lo=0.5, hi=1.0)
        if tau is not None and r is not None:
            raise ValueError(f"give tau or r, not both (got tau={tau!r}, r={r!r})")
        if r is not None:
            self.r = _real("r", r, lo=1.0, lo_open=True)
            tau = theory.tau_for_schedule(schedule, self.r)
        else:
            self.r = None
            tau = theory.tau_for_schedule(schedule) if tau is None else tau
        self.tau = _integer("tau", tau, 1, self.T)
        if not isinstance(dual, bool):
            raise ValueError(f"dual must be a bool, got {dual!r}")
        self.dual = dual
        if weighting not in SPEED_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {SPEED_WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        g = np.gradient(1.0 - _np(schedule.alphas_cumprod))
        span = g.max() - g.min()
        scaled = (g - g.min()) / span if span > 0 else np.zeros_like(g)
        rescaled = (1.0 - self.lam) + (2.0 * self.lam - 1.0) * scaled  # d/dt Psi mapped into [1 - lam, lam]
        self.change_aware = torch.from_numpy(rescaled)  # (T,) the weighting before the rule's cut at tau
        w = np.ones(self.T)
        if weighting == "official":
            w[: self.tau] = rescaled[: self.tau]
        elif weighting == "paper":
            w = rescaled
        self.weights = torch.from_numpy(w)
        # The reference code's "meaningful step" m: 1 + first t where d sqrt(1 - abar)/dt < 1e-4.
        gs = np.gradient(np.sqrt(1.0 - _np(schedule.alphas_cumprod)))
        below = np.nonzero(gs < 1e-4)[0]
        self.dual_m = int(below[0]) + 1 if below.size else self.T

    def _probs(self, step):
        p = torch.ones(self.T, dtype=torch.float64)
        p[: self.tau] = self.k
        return p

    def draws_needed(self, n):
        return n // 2 + 1 if self.dual else n

    def postprocess(self, t, n):
        if not self.dual:
            return t
        # Paired draws (reference code): n//2 + 1 come from P, their mirrors |t - m| fill the rest.
        return torch.cat([t, (t - self.dual_m).abs()])[:n]

    def params(self):
        out = {"k": self.k, "tau": self.tau, "lam": self.lam, "dual": self.dual, "weighting": self.weighting}
        if self.r is not None:
            out["r"] = self.r
        return out


class P2(TimestepStrategy):
    """Perception-prioritised weighting (Choi et al. 2022): w = 1 / (k + snr)^gamma."""

    name = "p2"

    def __init__(self, schedule, gamma: float = 1.0, k: float = 1.0):
        super().__init__(schedule)
        self.gamma = _real("gamma", gamma, lo=0.0)
        self.k = _real("k", k, lo=0.0, lo_open=True)
        self.weights = 1.0 / (self.k + schedule.snr) ** self.gamma

    def _probs(self, step):
        return torch.ones(self.T, dtype=torch.float64)

    def params(self):
        return {"gamma": self.gamma, "k": self.k}


class MinSNR(TimestepStrategy):
    """Min-SNR-gamma weighting for epsilon prediction (Hang et al. 2023): w = min(snr, gamma) / snr."""

    name = "min_snr"

    def __init__(self, schedule, gamma: float = 5.0):
        super().__init__(schedule)
        self.gamma = _real("gamma", gamma, lo=0.0, lo_open=True)
        snr = schedule.snr
        self.weights = torch.clamp(snr, max=self.gamma) / snr

    def _probs(self, step):
        return torch.ones(self.T, dtype=torch.float64)

    def params(self):
        return {"gamma": self.gamma}


class LogNormal(TimestepStrategy):
    """EDM's log-normal noise levels mapped to discrete steps:
    P(t) ~ N(ln sigma_t; p_mean, p_std) * |d ln sigma_t / dt|, sigma_t = sqrt((1 - abar_t) / abar_t)."""

    name = "lognormal"

    def __init__(self, schedule, p_mean: float = -1.2, p_std: float = 1.2):
        super().__init__(schedule)
        self.p_mean = _real("p_mean", p_mean)
        self.p_std = _real("p_std", p_std, lo=0.0, lo_open=True)
        ab = _np(schedule.alphas_cumprod)
        log_sigma = 0.5 * np.log((1.0 - ab) / ab)
        width = np.abs(np.gradient(log_sigma))
        z = (log_sigma - self.p_mean) / self.p_std
        p = np.exp(-0.5 * z**2) * width
        if not p.sum() > 0:
            raise ValueError(
                f"lognormal(p_mean={self.p_mean}, p_std={self.p_std}) puts no mass on this schedule's "
                f"noise levels ln sigma in [{log_sigma.min():.2f}, {log_sigma.max():.2f}]"
            )
        self._p = torch.from_numpy(p)

    def _probs(self, step):
        return self._p.clone()

    def params(self):
        return {"p_mean": self.p_mean, "p_std": self.p_std}


class CLTS(TimestepStrategy):
    """Curriculum time-step sampling: P_step = (1 - a) U + a N(mu, sigma) on 0..T-1,
    a = min(step / ramp_steps, 1). Defaults follow the reference code's intent (mu = 300,
    a 50k-step ramp) with a width that keeps the Gaussian meaningful on T = 1000."""

    name = "clts"
    step_dependent = True

    def __init__(self, schedule, mu: float = 300.0, sigma: float = 150.0, ramp_steps: int = 50_000):
        super().__init__(schedule)
        self.mu = _real("mu", mu, lo=0.0, hi=float(self.T - 1))
        self.sigma = _real("sigma", sigma, lo=0.0, lo_open=True)
        self.ramp_steps = _integer("ramp_steps", ramp_steps, 1)
        t = np.arange(self.T, dtype=np.float64)
        gauss = np.exp(-0.5 * ((t - self.mu) / self.sigma) ** 2)
        self._gauss = torch.from_numpy(gauss / gauss.sum())

    def mix(self, step: int) -> float:
        return min(step / self.ramp_steps, 1.0)

    def probs_key(self, step):
        return self.mix(step)

    def _probs(self, step):
        a = self.mix(step)
        return (1.0 - a) / self.T + a * self._gauss

    def params(self):
        return {"mu": self.mu, "sigma": self.sigma, "ramp_steps": self.ramp_steps}


class LossMoment(TimestepStrategy):
    """Improved DDPM's loss-second-moment resampler (Nichol and Dhariwal 2021, LossSecondMomentResampler)
    on `bins` equal time-step bins: bin j holds t with floor(t bins / T) = j, each keeps its last
    `history` unweighted per-sample losses; every `update_every` optimizer steps
    P(t) = (1 - floor) m_j / (sum_i m_i |bin j|) + floor / T, j the bin of t, m_j = sqrt(mean of
    L^2 over bin j's history), and uniform until every bin's history is full. With
    `importance_weights`, w(t) = 1 / (T P(t)) (the unbiased estimator of the uniform objective);
    without, w = 1. The statistics and the tables live on the training device
    (`speed_fast.adaptive.LossMomentStatistics`); here are the parameters and the formulas."""

    name = "loss_moment"
    adaptive = True

    def __init__(self, schedule, bins: int = 20, history: int = 10, floor: float = 0.001, update_every: int = 100,
                 importance_weights: bool = False):
        super().__init__(schedule)
        self.bins = _integer("bins", bins, 1, self.T)
        self.history = _integer("history", history, 1)
        self.floor = _real("floor", floor, lo=0.0, hi=1.0, lo_open=True)
        self.update_every = _integer("update_every", update_every, 1)
        if not isinstance(importance_weights, bool):
            raise ValueError(f"importance_weights must be a bool, got {importance_weights!r}")
        self.importance_weights = importance_weights
        self.bin_of = torch.arange(self.T, dtype=torch.int64) * self.bins // self.T  # (T,) bin of each t
        self.bin_size = torch.bincount(self.bin_of, minlength=self.bins).to(torch.float64)  # (bins,)

    def _probs(self, step):
        return torch.ones(self.T, dtype=torch.float64)

    def probs_from_moments(self, mean_sq: torch.Tensor, ready: torch.Tensor, bin_of: torch.Tensor | None = None,
                           bin_size: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [T] P(t) from the per-bin mean squared loss (float64 [bins]) and `ready` (a bool
        tensor: every bin's history is full), on their device, with no read-back: uniform unless
        ready and the moments have a positive finite sum. bin_of / bin_size: this strategy's, on
        that device (default: the CPU ones)."""
        bin_of = self.bin_of if bin_of is None else bin_of
        bin_size = self.bin_size if bin_size is None else bin_size
        m = mean_sq.sqrt()  # (bins,)
        total = m.sum()
        usable = ready & (total > 0) & torch.isfinite(total)
        per_t = (m / torch.where(usable, total, 1.0) / bin_size)[bin_of]  # (T,)
        p = (1.0 - self.floor) * per_t + self.floor / self.T
        return torch.where(usable, p, torch.full_like(p, 1.0 / self.T))

    def weights_for(self, p: torch.Tensor) -> torch.Tensor:
        """w(t) for P(t) = p: 1 / (T p) with importance weights, else ones (p's device and dtype)."""
        return 1.0 / (self.T * p) if self.importance_weights else torch.ones_like(p)

    def params(self):
        return {"bins": self.bins, "history": self.history, "floor": self.floor, "update_every": self.update_every,
                "importance_weights": self.importance_weights}

#: The largest factor by which one update of `adaptive_speed` moves k (up or down): k goes from 5 to its
#: default bound 10 in no fewer than 4 updates, so one noisy window cannot swing P(t).
ADAPTIVE_K_STEP = 1.25


def _default_tau(schedule: NoiseSchedule, r: float, fallback: int) -> int:
    try:
        return theory.tau_for_schedule(schedule, r)
    except ValueError:  # r beyond what this schedule reaches
        return fallback


class AdaptiveSpeeD(SpeeD):
    """SpeeD whose threshold tau and suppression k follow the run (ours). It starts as SpeeD(k, tau, lam,
    dual, weighting) exactly; the losses of `bins` equal time-step bins are averaged over windows of
    `update_every` optimizer steps, and once `history` windows are in, each update (every
    `update_every` steps) applies, with L_j the mean loss of bin j over the last `history` windows and
    d_j = -(history - 1) x the least-squares slope of ln(window mean) (e-folds bin j fell over them):

    * tau (the loss reading of Theorem 1's magnitude r): the target is the first bin edge e with
      sum_{t >= e} L(t) <= sum_t L(t) / r, clamped to [tau_min, tau_max]; tau moves towards it by at
      most one bin per update;
    * k (balanced relative progress): with D_conv and D_rest the mean d_j of the bins wholly above and
      wholly below tau, k <- clamp(k exp(clamp(D_conv - D_rest, +-ln ADAPTIVE_K_STEP)), k_min, k_max):
      a convergence area whose loss falls faster (in relative terms) than the rest gets fewer samples,
      one that falls slower (or rises) gets more;
    * P(t) = k for t < tau, 1 from tau on; w(t) is SpeeD's rule for the new tau (lam fixed).

    The rule and why: module `speed_fast.adaptive` and README "Convergence". The statistics live on
    the training device (`speed_fast.adaptive.AdaptiveSpeedStatistics`); here are the parameters and
    the formulas, on tensors of any device, with no read-back."""

    name = "adaptive_speed"
    adaptive = True

    def __init__(self, schedule, k: float = 5.0, tau: int | None = None, lam: float = 0.6, r: float | None = None,
                 dual: bool = False, weighting: str = "official", bins: int = 20, history: int = 4,
                 update_every: int = 100, k_min: float = 1.0, k_max: float = 10.0, tau_min: int | None = None,
                 tau_max: int | None = None):
        magnitude = theory.DEFAULT_MAGNITUDE if r is None else _real("r", r, lo=1.0, lo_open=True)
        start = theory.tau_for_schedule(schedule, magnitude) if tau is None else tau
        super().__init__(schedule, k=k, tau=start, lam=lam, dual=dual, weighting=weighting)
        self.r = None if r is None else magnitude
        self.magnitude = magnitude
        self.bins = _integer("bins", bins, 1, self.T)
        self.history = _integer("history", history, 2)
        self.update_every = _integer("update_every", update_every, 1)
        self.k_min = _real("k_min", k_min, lo=1.0)
        self.k_max = _real("k_max", k_max, lo=self.k_min)
        if not self.k_min <= self.k <= self.k_max:
            raise ValueError(f"k must lie in [k_min, k_max] = [{self.k_min}, {self.k_max}], got {self.k}")
        # Default bounds: Theorem 1's tau for magnitudes 10 and 1000 (476 and 828 on DDPM's schedule).
        lo = min(_default_tau(schedule, 10.0, 1), self.tau) if tau_min is None else tau_min
        hi = max(_default_tau(schedule, 1000.0, self.T), self.tau) if tau_max is None else tau_max
        self.tau_min = _integer("tau_min", lo, 1, self.T)
        self.tau_max = _integer("tau_max", hi, self.tau_min, self.T)
        if not self.tau_min <= self.tau <= self.tau_max:
            raise ValueError(f"tau must lie in [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}], got {self.tau}")
        self.bin_of = torch.arange(self.T, dtype=torch.int64) * self.bins // self.T  # (T,) bin of each t
        self.bin_size = torch.bincount(self.bin_of, minlength=self.bins).to(torch.float64)  # (bins,)
        # (bins + 1,) first t of each bin, then T.
        self.bin_edges = torch.searchsorted(self.bin_of, torch.arange(self.bins + 1, dtype=torch.int64))
        self.tau_step = int(self.bin_size.max())

    def tables(self, device) -> dict:
        """The constant tensors of the rule on `device` (built once by the statistics)."""
        f64 = dict(dtype=torch.float64, device=device)
        return {"t": torch.arange(self.T, device=device), "bin_edges": self.bin_edges.to(device),
                "bin_size": self.bin_size.to(**f64), "change_aware": self.change_aware.to(**f64),
                "slope_x": (torch.arange(self.history, **f64) - (self.history - 1) / 2.0)}

    def adapt(self, k: torch.Tensor, tau: torch.Tensor, means: torch.Tensor, ready: torch.Tensor,
              tab: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, tau) after one update. k float64 [], tau int64 [], means float64 [history, bins] (the
        window means, oldest first, > 0 where ready), ready bool [] (else k and tau stay)."""
        log_l = means.clamp(min=1e-30).log()  # (history, bins)
        x = tab["slope_x"]  # (history,) centred window index
        slope = (x.unsqueeze(1) * (log_l - log_l.mean(0))).sum(0) / (x * x).sum()  # (bins,) per window
        fell = -slope * (self.history - 1)  # (bins,) e-folds fallen over the history
        level = means.mean(0)  # (bins,)
        edges = tab["bin_edges"]  # (bins + 1,)
        # k, from the split at the current tau (bins straddling it are in neither group).
        conv = (edges[:-1] >= tau).double()
        rest = (edges[1:] <= tau).double()
        both = (conv.sum() > 0) & (rest.sum() > 0)
        gap = (fell * conv).sum() / conv.sum().clamp(min=1.0) - (fell * rest).sum() / rest.sum().clamp(min=1.0)
        limit = math.log(ADAPTIVE_K_STEP)
        k_new = (k * gap.clamp(-limit, limit).exp()).clamp(self.k_min, self.k_max)
        # tau: the first edge whose tail holds at most 1/r of the loss mass, approached one bin at a time.
        mass = level * tab["bin_size"]  # (bins,)
        tail = mass.flip(0).cumsum(0).flip(0)  # (bins,) sum over bins >= j
        first = (tail > mass.sum() / self.magnitude).sum()  # tail is non-increasing: bins before the edge
        target = edges[first].clamp(self.tau_min, self.tau_max)
        tau_new = tau + (target - tau).clamp(-self.tau_step, self.tau_step)
        return torch.where(ready & both, k_new, k), torch.where(ready, tau_new, tau)

    def probs_for(self, k: torch.Tensor, tau: torch.Tensor, tab: dict) -> torch.Tensor:
        """float64 [T]: SpeeD's P(t) for (k, tau) (device tensors), normalised."""
        p = torch.where(tab["t"] < tau, k, 1.0)
        return p / p.sum()

    def weights_for_tau(self, tau: torch.Tensor, tab: dict) -> torch.Tensor:
        """float64 [T]: SpeeD's w(t) (this strategy's weighting and lam) for threshold tau."""
        w = tab["change_aware"]
        if self.weighting == "official":
            return torch.where(tab["t"] < tau, w, 1.0)
        return w.clone() if self.weighting == "paper" else torch.ones_like(w)

    def params(self):
        out = {**super().params(), "bins": self.bins, "history": self.history, "update_every": self.update_every,
               "k_min": self.k_min, "k_max": self.k_max, "tau_min": self.tau_min, "tau_max": self.tau_max}
        return out


_REGISTRY = {cls.name: cls for cls in (Uniform, SpeeD, P2, MinSNR, LogNormal, CLTS, LossMoment, AdaptiveSpeeD)}


def make_strategy(name: str, schedule: NoiseSchedule, **params) -> TimestepStrategy:
    """Build a strategy by name (one of STRATEGIES)."""
    if name not in _REGISTRY:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    cls = _REGISTRY[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "schedule")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for strategy {name!r}; allowed: {allowed}")
    return cls(schedule, **params)
