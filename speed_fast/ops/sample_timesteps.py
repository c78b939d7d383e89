"""sample_timesteps: time steps by the alias method, O(1) per draw (see `speed_fast.alias`).

    t = sample_timesteps(prob, alias, n, seed, step, offset=0, backend="auto")   # int64 [n]

Draw i uses Philox counter offset + i of the time-step stream at (seed, step) (`speed_fast.rng`):
column c = (r0 T) >> 32, t = c if uniform(r1) < prob[c] else alias[c]. The draws are integers:
every backend gives the same t, bit for bit. Nothing to differentiate, so no autograd Function.
"""

from __future__ import annotations

import torch

from .. import rng
from . import backends
from .validate import check_alias_table, check_n, check_seed_step


def sample_timesteps_ref(prob: torch.Tensor, alias: torch.Tensor, n: int, seed: int, step: int,
                         offset: int = 0) -> torch.Tensor:
    """The torch reference: int64 [n] on prob's device."""
    column, coin = rng.alias_draws_ref(n, prob.numel(), seed, step, offset, device=prob.device)
    keep = coin < prob[column]
    return torch.where(keep, column, alias[column].long())


def implementation(backend: str):
    """The function that runs this op on a resolved backend name."""
    return sample_timesteps_ref if backend == "torch" else backends.module(backend).sample_timesteps


def sample_timesteps(prob, alias, n, seed=0, step=0, offset=0, backend="auto") -> torch.Tensor:
    """int64 [n] on prob's device: draws offset .. offset + n - 1 of the alias table at (seed, step)."""
    check_alias_table(prob, alias)
    n = check_n(n)
    seed, step, offset = check_seed_step(seed, step, offset)
    return implementation(backends.resolve_backend(backend, prob.device))(prob, alias, n, seed, step, offset)
