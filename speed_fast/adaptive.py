"""The device-side state of an adaptive time-step strategy (`loss_moment`): the per-bin loss
histories, and the rebuild of P(t)'s alias table and of w(t) from them, with no host
synchronisation.

    stats = LossMomentStatistics(strategy, device)
    stats.observe(t, loss, keep)          # a step's per-sample unweighted losses, on the device
    p = stats.probs()                     # float64 [T] on the device, from the histories
    prob, alias = build_alias_table_device(p)

Each bin has a ring buffer of its last `history` losses and a count of every loss it was given;
a batch is written in its order (sample b before b + 1), so the buffers are a pure function of the
losses observed and their order. When one batch holds more than `history` losses of a bin only
its last `history` are written (the others would be overwritten by them anyway); the unwritten
ones go to one spare slot, all with the value 0, so that no two writes race for a slot with
different values (a scatter's duplicates are unordered on a GPU).
"""

from __future__ import annotations

import torch

from .timesteps import LossMoment


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

    def state_dict(self) -> dict:
        return {"ring": self.ring.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("ring", "counts"):
            value, mine = state[name], getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != mine.shape or value.dtype != mine.dtype:
                raise ValueError(f"loss_moment state {name!r}: expected {mine.dtype} {tuple(mine.shape)} (bins="
                                 f"{self.bins}, history={self.history}), got {value!r:.80}")
            mine.copy_(value)
