"""FusedSpeeD: the device-side tables of one run, built once, and the two fused passes.

    fused = FusedSpeeD(schedule, strategy, device="cuda", backend="auto", seed=run_seed)
    t, x_t = fused.sample_and_noise(x0, step=micro_step, offset=rank * local_batch, strategy_step=opt_step)
    loss, mse = fused.loss(pred_eps, t, step=micro_step, offset=rank * local_batch)

The tables (alias table of P, sqrt(abar), sqrt(1 - abar), w) are validated once here, so the
per-step calls never synchronise the device: no value checks, no `.item()`, no blocking copy.
A step-dependent P(t) (CLTS) gets a new alias table whenever its key changes; the table is
built on the host (the same table the reference builds, so the same t) and sent from pinned
memory with a non-blocking copy that queues behind the work already submitted.

An adaptive strategy (`loss_moment`, `adaptive_speed`) learns P(t) from the run: the trainer gives
the fused step every step's per-sample losses (`observe`, device tensors) and calls `end_step` after
each optimizer step; every `update_every` steps the statistics (`speed_fast.adaptive`) give a new
P(t) and w(t) on the device, P becomes an alias table built there
(`speed_fast.alias.build_alias_table_device`), and both are copied into the tables in place.
Nothing is read back, so the table in force at step s is a function of the losses of steps before
the last multiple of `update_every` <= s; `state_dict` holds it with the statistics for a
checkpoint.
"""

from __future__ import annotations

import torch

from .. import rng
from ..adaptive import make_statistics
from ..alias import build_alias_table, build_alias_table_device, check_alias_table
from ..schedule import NoiseSchedule
from ..theory import area_index
from ..timesteps import TimestepStrategy
from .backends import resolve_backend
from .sample_and_noise import implementation as noise_implementation
from .sample_timesteps import implementation as draw_implementation
from .validate import check_batch, check_finite_table
from .weighted_mse import WeightedMSEFunction
from .weighted_mse import implementation as loss_implementation


def canonical_device(device) -> torch.device:
    """`device` with its index: torch.device("cuda") != torch.device("cuda:0"), although tensors
    created on the first are on the second; comparing a tensor's device needs the index."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class FusedSpeeD:
    def __init__(self, schedule: NoiseSchedule, strategy: TimestepStrategy, device="cpu", backend: str = "auto",
                 seed: int = 0):
        if strategy.schedule is not schedule and not torch.equal(strategy.schedule.betas, schedule.betas):
            # Its weights (and SpeeD's tau) were derived from another schedule's abar.
            raise ValueError(f"strategy was built for another schedule ({strategy.schedule.describe()}), "
                             f"got {schedule.describe()}")
        self.schedule = schedule
        self.strategy = strategy
        self.device = canonical_device(device)
        self.backend = resolve_backend(backend, self.device)
        self._draw = draw_implementation(self.backend)
        self._sample_and_noise, self._add_noise = noise_implementation(self.backend)
        self._loss_fwd = loss_implementation(self.backend)
        self.seed = rng.check_seed(seed)  # once: the seed does not change per call
        f32 = dict(dtype=torch.float32, device=self.device)
        self.sqrt_ab = schedule.sqrt_alphas_cumprod.to(**f32)
        self.sqrt_1mab = schedule.sqrt_one_minus_alphas_cumprod.to(**f32)
        check_finite_table("weights", strategy.weights)
        self.weights = strategy.weights.to(**f32)
        self.areas = area_index(schedule, strategy.area_tau()).to(self.device)  # (T,) 0/1/2
        self._probs_key = None
        self._refresh(0)
        self.adaptive = make_statistics(strategy, self.device) if strategy.adaptive else None

    def _refresh(self, step: int, strategy_step: int | None = None) -> None:
        """Point prob/alias at the alias table of P(t) at `strategy_step` (default `step`) when its key
        differs from the current table's (only step-dependent strategies ever change key)."""
        step = step if strategy_step is None else strategy_step
        key = self.strategy.probs_key(step)
        if key == self._probs_key:
            return
        prob, alias = build_alias_table(self.strategy.probs(step))  # (T,) float32, (T,) int32
        T = prob.numel()
        if self.device.type == "cuda":
            # One pinned buffer, one non-blocking copy; torch's pinned-memory allocator keeps the
            # buffer alive until the copy has run.
            host = torch.empty(2 * T, dtype=torch.int32, pin_memory=True)
            host[:T] = prob.view(torch.int32)
            host[T:] = alias
            table = host.to(self.device, non_blocking=True)
            self.prob, self.alias = table[:T].view(torch.float32), table[T:]
        else:
            self.prob, self.alias = prob.to(self.device), alias.to(self.device)
        self._probs_key = key

    def sample_timesteps(self, n: int, step: int, offset: int = 0, strategy_step: int | None = None) -> torch.Tensor:
        """int64 [n]: the batch's time steps (dual strategies mirror half of the draws).

        `step` keys the RNG (the micro-step); `strategy_step` (default: step) is the training step at
        which a step-dependent P(t) is evaluated, e.g. the optimizer step under gradient accumulation."""
        step, offset = rng.check_step_offset(step, offset)
        self._refresh(step, strategy_step)
        draws = self._draw(self.prob, self.alias, self.strategy.draws_needed(n), self.seed, step, offset)
        return self.strategy.postprocess(draws, n)

    def sample_and_noise(self, x0: torch.Tensor, step: int, offset: int = 0, strategy_step: int | None = None):
        """(t, x_t) for a batch of clean latents x0 [B, ...] on this object's device (see
        sample_timesteps for `strategy_step`)."""
        check_batch("x0", x0)
        if x0.device != self.device:
            raise ValueError(f"x0 must be on {self.device}, got {x0.device}")
        step, offset = rng.check_step_offset(step, offset)
        if self.strategy.draws_needed(x0.shape[0]) != x0.shape[0]:
            t = self.sample_timesteps(x0.shape[0], step, offset, strategy_step)
            return t, self._add_noise(x0, t, self.sqrt_ab, self.sqrt_1mab, self.seed, step, offset)
        self._refresh(step, strategy_step)
        return self._sample_and_noise(x0, self.prob, self.alias, self.sqrt_ab, self.sqrt_1mab, self.seed, step,
                                      offset)

    def loss(self, pred: torch.Tensor, t: torch.Tensor, step: int, offset: int = 0):
        """(loss, mse): the weighted MSE against the noise of sample_and_noise at the same step."""
        check_batch("pred", pred)
        if pred.device != self.device or t.shape != (pred.shape[0],):
            raise ValueError(f"pred must be on {self.device} with t of shape ({pred.shape[0]},), "
                             f"got pred on {pred.device} and t of shape {tuple(t.shape)}")
        step, offset = rng.check_step_offset(step, offset)
        return WeightedMSEFunction.apply(pred, t, self.weights, self.seed, step, offset, self._loss_fwd)

    def observe(self, t: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Give an adaptive strategy the per-sample unweighted losses (float [n]) of time steps t (int64 [n])
        on this device; `keep` (bool [n] or [1]) masks out losses of a skipped step. No-op otherwise."""
        if self.adaptive is not None:
            self.adaptive.observe(t, loss, keep)

    def end_step(self, steps_done: int) -> None:
        """After optimizer step `steps_done - 1`: an adaptive strategy rebuilds P(t)'s alias table (and w)
        on the device when `steps_done` is a multiple of its update_every."""
        if self.adaptive is not None and steps_done % self.strategy.update_every == 0:
            self._adapt()

    @torch.no_grad()
    def _adapt(self) -> None:
        p, w = self.adaptive.update()  # (T,) float64 each, on the device
        prob, alias = build_alias_table_device(p)
        self.prob.copy_(prob)
        self.alias.copy_(alias)
        self.weights.copy_(w)

    def state_dict(self) -> dict:
        """An adaptive strategy's statistics and the tables in force (CPU tensors; {} for a fixed P)."""
        if self.adaptive is None:
            return {}
        return {**self.adaptive.state_dict(), "prob": self.prob.cpu(), "alias": self.alias.cpu(),
                "weights": self.weights.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is None:
            if state:
                raise ValueError(f"strategy {self.strategy.name} keeps no state, got {sorted(state)}")
            return
        missing = sorted({*self.adaptive.STATE, "prob", "alias", "weights"} - set(state))
        if missing:
            raise ValueError(f"{self.strategy.name} state lacks {missing}")
        for name in ("prob", "alias", "weights"):
            value, mine = state[name], getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != mine.shape or value.dtype != mine.dtype:
                raise ValueError(f"{self.strategy.name} state {name!r}: expected {mine.dtype} {tuple(mine.shape)}, "
                                 f"got {value!r:.80}")
        check_alias_table(state["prob"], state["alias"])
        self.adaptive.load_state_dict(state)
        for name in ("prob", "alias", "weights"):
            getattr(self, name).copy_(state[name])

    def area_losses(self, t: torch.Tensor, per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) fp32 [3] of per-sample values in the acceleration/deceleration/convergence areas."""
        idx = self.areas[t]
        sums = torch.zeros(3, dtype=torch.float32, device=self.device).index_add_(0, idx, per_sample.float())
        counts = torch.zeros(3, dtype=torch.float32, device=self.device).index_add_(
            0, idx, torch.ones_like(per_sample, dtype=torch.float32))
        return sums, counts
