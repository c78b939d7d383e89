"""The device-side state of the adaptive time-step strategies (`loss_moment`, `adaptive_speed`): the
per-bin loss statistics, and the rebuild of P(t) and w(t) from them, with no host synchronisation.

    stats = make_statistics(strategy, device)
    stats.observe(t, loss, keep)          # a step's per-sample unweighted losses, on the device
    p, w = stats.update()                 # every update_every steps: float64 [T] each, on the device
    prob, alias = build_alias_table_device(p)

The statistics are a pure function of the losses observed and their order, held in fixed-shape
device tensors that the checkpoint saves (`state_dict`), so a resumed run continues bit for bit.

loss_moment (improved DDPM's resampler, per bin)
------------------------------------------------
Each bin has a ring buffer of its last `history` losses and a count of every loss it was given;
a batch is written in its order (sample b before b + 1). When one batch holds more than `history`
losses of a bin only its last `history` are written (the others would be overwritten by them
anyway); the unwritten ones go to one spare slot, all with the value 0, so that no two writes race
for a slot with different values (a scatter's duplicates are unordered on a GPU).

adaptive_speed (ours: SpeeD whose tau and k follow the run)
-----------------------------------------------------------
SpeeD fixes its areas and its suppression k before training from the noise schedule alone (Theorem
1's magnitude r = 140 puts tau at 700 on DDPM's schedule; k = 5). adaptive_speed starts there, bit
for bit, and re-estimates tau and k from what the trainer already has on the device every step:
each sample's unweighted MSE (the loss before SpeeD's weight; a skipped step's and non-finite
losses are left out). Gradient sizes per area would need per-sample gradients; the loss needs
nothing new.

Statistics. T is cut into `bins` equal bins (default 20, edges e_0 = 0 < ... < e_bins = T). The
losses of each window of `update_every` optimizer steps (default 100) are averaged per bin (a
fixed-shape masked sum over the batch, not a scatter-add, so the bits do not depend on the order
a GPU adds in); a bin with no loss in a window repeats its previous mean. The last `history`
window means per bin (default 4) are kept in a ring. With L_j the mean of bin j's window means and
d_j = -(history - 1) x the least-squares slope of ln(window mean) over the windows (how many
e-folds bin j's loss fell across the history):

  * tau: the target is the first bin edge e with  sum_{j: e_j >= e} L_j |bin j| <= sum_j L_j |bin j| / r.
    Why: Theorem 1 puts tau where 1/abar_t reaches r, where x_t's signal-to-noise ratio is about
    1/r and the increments carry almost nothing left to learn. The loss reading of that is the same 1/r share of what
    there is still to learn: the tail of t whose remaining loss is negligible. A model that masters
    the high-noise end early pulls tau down (more of T suppressed); one that still errs there
    pushes it up.
  * k: with D_conv and D_rest the mean d_j over the bins wholly at or above tau and wholly below it
    (a bin straddling tau counts in neither; without both groups k stays),
        k <- clamp(k * exp(clamp(D_conv - D_rest, -ln 1.25, +ln 1.25)), k_min, k_max).
    Why: SpeeD samples the convergence area k times less because it "converges quickly"; that is a
    claim about relative progress, and the run measures it. If the suppressed area's loss still
    falls faster (in e-folds) than the rest's, it is learnt without the samples: suppress it more.
    If it falls slower, or rises (under-sampling shows), give samples back. The fixed point is
    equal relative progress in both groups.
  * P(t) = k for t < tau, 1 from tau on (SpeeD's two levels); w(t) is SpeeD's change-aware
    weighting for the new tau, lam fixed (in the digits ablation the weighting alone was 0.90x,
    the sampling carried the gain: the rule tunes the sampling). The dual (mirrored) draw is unchanged.

Bounds. k in [k_min, k_max] (default [1, 10]: from no suppression to twice SpeeD's); tau in
[tau_min, tau_max] (default Theorem 1's tau for r = 10 and r = 1000, 477 and 829 on DDPM's
schedule, widened to hold the start). The clamps are applied to the values in force, so no loss
statistic (zero, tiny, huge, rising, empty bins) can take tau or k out of them.

Damping. Nothing moves until `history` windows are in and every window mean is positive and
finite (the run starts as SpeeD exactly); then, once per update, k moves by a factor of at most
1.25 (5 -> 10 takes 4 updates) and tau by at most one bin, towards a target computed from
history x update_every steps of losses, so one noisy window cannot swing P(t).

The values in force, and a trace of (k, tau) after each update (the last TRACE), are in the state
and the checkpoint. The trainer's per-area loss records keep the start's tau (areas fixed for the
run), so they stay comparable with static SpeeD's; the trace says where tau went.
"""

from __future__ import annotations

import torch

from .timesteps import AdaptiveSpeeD, LossMoment, TimestepStrategy


def make_statistics(strategy: TimestepStrategy, device):
    """The device-side statistics of an adaptive strategy (`strategy.adaptive`)."""
    if isinstance(strategy, AdaptiveSpeeD):
        return AdaptiveSpeedStatistics(strategy, device)
    return LossMomentStatistics(strategy, device)


def _load_tensors(owner, state: dict, names, what: str) -> None:
    for name in names:
        value, mine = state[name], getattr(owner, name)
        if not isinstance(value, torch.Tensor) or value.shape != mine.shape or value.dtype != mine.dtype:
            raise ValueError(f"{what} state {name!r}: expected {mine.dtype} {tuple(mine.shape)}, got {value!r:.80}")
    for name in names:
        getattr(owner, name).copy_(state[name])


class LossMomentStatistics:
    def __init__(self, strategy: LossMoment, device):
        if not isinstance(strategy, LossMoment):
            raise ValueError(f"LossMomentStatistics needs a loss_moment strategy, got {strategy!r}")
        self.strategy = strategy
        self.device = torch.device(device)
        self.bins, self.history = strategy.bins, strategy.history
        self.bin_of = strategy.bin_of.to(self.device)  # (T,)
        self.bin_size = strategy.bin_size.to(self.device)  # (bins,)
        self.bin_ids = torch.arange(self.bins, device=self.device)  # (bins,)
        # (bins * history + 1,): bin j's ring is [j * history, (j + 1) * history); the last slot is the spare.
        self.ring = torch.zeros(self.bins * self.history + 1, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(self.bins, dtype=torch.int64, device=self.device)  # losses ever given, per bin

    @torch.no_grad()
    def observe(self, t: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add the losses (float [n]) of time steps t (int64 [n]) where `keep` (bool [n] or [1]) holds."""
        b = self.bin_of[t]  # (n,)
        kept = torch.ones_like(b, dtype=torch.bool) if keep is None else keep.expand(b.shape)
        # (n, bins) int64; a comparison rather than one_hot, which checks its input's range on the host.
        onehot = ((b.unsqueeze(1) == self.bin_ids) & kept.unsqueeze(1)).to(torch.int64)
        rank = (torch.cumsum(onehot, 0) - 1).gather(1, b.unsqueeze(1)).squeeze(1)  # (n,) order within its bin
        per_bin = onehot.sum(0)  # (bins,)
        write = kept & (rank >= per_bin[b] - self.history)
        slot = b * self.history + (self.counts[b] + rank) % self.history
        spare = self.bins * self.history
        self.ring.scatter_(0, torch.where(write, slot, spare), torch.where(write, loss.float(), 0.0))
        self.counts.add_(per_bin)

    def ready(self) -> torch.Tensor:
        """bool []: every bin's history is full."""
        return (self.counts >= self.history).all()

    def mean_square(self) -> torch.Tensor:
        """float64 [bins]: mean of L^2 over each bin's ring (zeros included while it fills)."""
        ring = self.ring[:-1].view(self.bins, self.history).to(torch.float64)
        return (ring * ring).mean(dim=1)

    def probs(self) -> torch.Tensor:
        """float64 [T] on the device: the strategy's P(t) from the current histories."""
        return self.strategy.probs_from_moments(self.mean_square(), self.ready(), self.bin_of, self.bin_size)

    @torch.no_grad()
    def update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, w) float64 [T] on the device from the current histories (called every update_every steps)."""
        p = self.probs()
        return p, self.strategy.weights_for(p)

    STATE = ("ring", "counts")

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        _load_tensors(self, state, self.STATE, f"loss_moment (bins={self.bins}, history={self.history})")


class AdaptiveSpeedStatistics:
    """`adaptive_speed`'s state on the device: the current window's per-bin loss sums and counts, the
    last `history` window means per bin (a ring, `windows` of them ever closed), the losses ever seen
    per bin, the current k and tau, and a trace of (k, tau) after each update (the last TRACE).

    A step's losses are summed per bin as a (n, bins) masked product reduced over n: a fixed-shape
    reduction, the same bits on every run of one device (a scatter-add on a GPU adds in any order).
    A bin without a loss in a window repeats its previous mean, so a window does not need every bin."""

    TRACE = 1024
    STATE = ("window_sum", "window_n", "means", "windows", "counts", "k", "tau", "trace")

    def __init__(self, strategy: AdaptiveSpeeD, device):
        if not isinstance(strategy, AdaptiveSpeeD):
            raise ValueError(f"AdaptiveSpeedStatistics needs an adaptive_speed strategy, got {strategy!r}")
        self.strategy = strategy
        self.device = torch.device(device)
        self.bins, self.history = strategy.bins, strategy.history
        self.tab = strategy.tables(self.device)
        self.bin_of = strategy.bin_of.to(self.device)  # (T,)
        self.bin_ids = torch.arange(self.bins, device=self.device)  # (bins,)
        f64, i64 = dict(dtype=torch.float64, device=self.device), dict(dtype=torch.int64, device=self.device)
        self.window_sum = torch.zeros(self.bins, **f64)
        self.window_n = torch.zeros(self.bins, **i64)
        self.means = torch.zeros(self.history, self.bins, **f64)  # window w at row w % history
        self.windows = torch.zeros((), **i64)
        self.counts = torch.zeros(self.bins, **i64)
        self.k = torch.full((), strategy.k, **f64)
        self.tau = torch.full((), strategy.tau, **i64)
        self.trace = torch.zeros(self.TRACE, 2, **f64)  # (k, tau) after update w at row (w - 1) % TRACE
        self.rows = torch.arange(self.history, device=self.device)

    @torch.no_grad()
    def observe(self, t: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add the losses (float [n]) of time steps t (int64 [n]) where `keep` (bool [n] or [1]) holds."""
        b = self.bin_of[t]  # (n,)
        kept = torch.ones_like(b, dtype=torch.bool) if keep is None else keep.expand(b.shape)
        onehot = (b.unsqueeze(1) == self.bin_ids) & kept.unsqueeze(1)  # (n, bins)
        self.window_sum.add_(torch.where(onehot, loss.double().unsqueeze(1), 0.0).sum(0))
        n = onehot.sum(0)  # (bins,) int64
        self.window_n.add_(n)
        self.counts.add_(n)

    def ready(self) -> torch.Tensor:
        """bool []: `history` windows are closed and each holds a positive finite mean for every bin."""
        return (self.windows >= self.history) & ((self.means > 0) & torch.isfinite(self.means)).all()

    def ordered_means(self) -> torch.Tensor:
        """float64 [history, bins]: the window means, oldest first."""
        return self.means[(self.windows + self.rows) % self.history]

    @torch.no_grad()
    def update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Close the window, apply the rule (AdaptiveSpeeD.adapt), and return (P, w) float64 [T]."""
        previous = self.means[(self.windows - 1) % self.history]  # (bins,) zeros before the first window
        mean = torch.where(self.window_n > 0, self.window_sum / self.window_n.clamp(min=1), previous)
        self.means.index_copy_(0, (self.windows % self.history).view(1), mean.view(1, -1))
        self.windows.add_(1)
        self.window_sum.zero_()
        self.window_n.zero_()
        k, tau = self.strategy.adapt(self.k, self.tau, self.ordered_means(), self.ready(), self.tab)
        self.k.copy_(k)
        self.tau.copy_(tau)
        row = torch.stack([self.k, self.tau.double()]).view(1, 2)
        self.trace.index_copy_(0, ((self.windows - 1) % self.TRACE).view(1), row)
        return self.strategy.probs_for(self.k, self.tau, self.tab), self.strategy.weights_for_tau(self.tau, self.tab)

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        _load_tensors(self, state, self.STATE, f"adaptive_speed (bins={self.bins}, history={self.history})")
