"""Triton kernel: time steps by the alias method, O(1) per draw (one Philox per draw).

    _sample_timesteps_kernel -> sample_timesteps_fwd (launcher)

The custom op and backend entry point are in `speed_fast/ops/_triton.py`.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .rng import alias_draw, seed_keys

BLOCK = 512  # draws per program
NUM_WARPS = 4


# The RNG coordinates change every step and T never matters for speed: no specialisation on them.
@triton.jit(do_not_specialize=["T", "seed", "step", "offset"])
def _sample_timesteps_kernel(t_ptr, prob_ptr, alias_ptr, T: tl.int32, n: tl.int64, seed: tl.uint64, step: tl.uint32,
                             offset: tl.int64, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) draw index in the batch
    k0, k1 = seed_keys(seed)
    t = alias_draw(prob_ptr, alias_ptr, T, k0, k1, step, i + offset)  # columns are < T: no mask needed
    tl.store(t_ptr + i, t, mask=i < n)


def sample_timesteps_fwd(prob: torch.Tensor, alias: torch.Tensor, n: int, seed: int, step: int,
                         offset: int) -> torch.Tensor:
    """int64 [n]: draws offset .. offset + n - 1 of the alias table (prob, alias) at (seed, step)."""
    t = torch.empty(n, dtype=torch.int64, device=prob.device)  # (n,)
    if n == 0:
        return t
    programs = triton.cdiv(n, BLOCK)
    if programs > launch.MAX_BATCH:
        raise ValueError(f"n must be <= {launch.MAX_BATCH * BLOCK} for the triton backend, got {n}")
    with launch.device_guard(prob):
        _sample_timesteps_kernel[(programs,)](t, prob, alias, prob.numel(), n, seed, step, offset, BLOCK=BLOCK,
                                              num_warps=NUM_WARPS)
    return t


def compile_cases() -> list[launch.Case]:
    """Every variant a launch can compile (see `speed_fast.kernels.aot`)."""
    args = dict(t_ptr=launch.Pointer(torch.int64), prob_ptr=launch.Pointer(torch.float32),
                alias_ptr=launch.Pointer(torch.int32), T=1000, n=256)
    return [launch.Case("sample_timesteps", "-", "", _sample_timesteps_kernel, args, dict(BLOCK=BLOCK), NUM_WARPS,
                        BLOCK, unit="draw")]
