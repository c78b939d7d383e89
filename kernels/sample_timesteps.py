"""Triton kernel: time steps by the alias method, O(1) per draw (one Philox per draw).

    _sample_timesteps_kernel -> sample_timesteps_fwd (launcher)

The custom op and backend entry point are in `speed_fast/ops/_triton.py`.
"""

import torch
import triton
import triton.language as tl

from .rng import alias_draw


# The RNG coordinates change every step: no recompilation for their values.
@triton.jit(do_not_specialize=["seed", "step", "offset"])
def _sample_timesteps_kernel(t_ptr, prob_ptr, alias_ptr, T, n, seed, step, offset, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) draw index in the batch
    t = alias_draw(prob_ptr, alias_ptr, T, seed, step, i + offset)  # columns are < T: no mask needed
    tl.store(t_ptr + i, t, mask=i < n)


def sample_timesteps_fwd(prob: torch.Tensor, alias: torch.Tensor, n: int, seed: int, step: int,
                         offset: int) -> torch.Tensor:
    """int64 [n]: draws offset .. offset + n - 1 of the alias table (prob, alias) at (seed, step)."""
    t = torch.empty(n, dtype=torch.int64, device=prob.device)  # (n,)
    if n == 0:
        return t
    block = 1024 if n >= 1024 else triton.next_power_of_2(n)
    _sample_timesteps_kernel[(triton.cdiv(n, block),)](t, prob, alias, prob.numel(), n, seed, step, offset,
                                                       BLOCK=block)
    return t
