"""Triton kernel: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps in one pass over x0.

The time step of each sample is drawn in the same kernel (alias method) unless
given; eps is generated in registers (Philox + Box-Muller) and never written to
memory. One program handles BLOCK_C Philox counters (4 BLOCK_C elements) of one
sample; the grid is (programs per sample, B).

    _sample_and_noise_fwd_kernel -> sample_and_noise_fwd / add_noise_fwd (launchers)
"""

import torch
import triton
import triton.language as tl

from .rng import alias_draw, normal_block
from .sample_timesteps import sample_timesteps_fwd


# The RNG coordinates change every step: no recompilation for their values.
@triton.jit(do_not_specialize=["seed", "step", "offset"])
def _sample_and_noise_fwd_kernel(x0_ptr, xt_ptr, t_ptr, prob_ptr, alias_ptr, sqrt_ab_ptr, sqrt_1mab_ptr, T, D, seed,
                                 step, offset, DRAW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b + offset  # global sample index
    if DRAW:
        t = alias_draw(prob_ptr, alias_ptr, T, seed, step, row)
        tl.store(t_ptr + b, t, mask=pid == 0)
    else:
        t = tl.load(t_ptr + b)
    valid = (t >= 0) & (t < T)  # a corrupt table gives NaN, never an out-of-bounds read
    a = tl.load(sqrt_ab_ptr + t, mask=valid, other=float("nan"))
    s = tl.load(sqrt_1mab_ptr + t, mask=valid, other=float("nan"))
    g0 = row * D  # global index of the sample's first element
    first_counter = g0 // 4 + pid * BLOCK_C
    eps = normal_block(seed, step, first_counter, BLOCK_C)  # (4 BLOCK_C,)
    g = first_counter * 4 + tl.arange(0, 4 * BLOCK_C)  # (4 BLOCK_C,) global element index
    mask = (g >= g0) & (g < g0 + D)
    idx = b * D + (g - g0)
    x = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(xt_ptr + idx, (a * x + s * eps).to(xt_ptr.dtype.element_ty), mask=mask)


def _grid(D: int, B: int) -> tuple[tuple[int, int], int]:
    counters = (D + 2) // 4 + 1  # the most Philox counters one sample's elements can touch
    block_c = min(256, triton.next_power_of_2(counters))
    return (triton.cdiv(counters, block_c), B), block_c


def _launch(x0, t, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset, draw: bool) -> torch.Tensor:
    B = x0.shape[0]
    D = x0.numel() // B if B else 0
    xt = torch.empty_like(x0)  # (B, ...)
    if B == 0 or D == 0:
        return xt
    grid, block_c = _grid(D, B)
    _sample_and_noise_fwd_kernel[grid](x0, xt, t, prob, alias, sqrt_ab, sqrt_1mab, sqrt_ab.numel(), D, seed, step,
                                       offset, DRAW=draw, BLOCK_C=block_c)
    return xt


def sample_and_noise_fwd(x0, prob, alias, sqrt_ab, sqrt_1mab, seed: int, step: int, offset: int):
    """(t int64 [B], x_t like x0): time steps from the alias table, then the noised batch."""
    B = x0.shape[0]
    if B == 0 or x0.numel() == 0:  # nothing to noise: the draws alone
        return sample_timesteps_fwd(prob, alias, B, seed, step, offset), torch.empty_like(x0)
    t = torch.empty(B, dtype=torch.int64, device=x0.device)  # (B,) written by the kernel
    return t, _launch(x0, t, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset, draw=True)


def add_noise_fwd(x0, t, sqrt_ab, sqrt_1mab, seed: int, step: int, offset: int) -> torch.Tensor:
    """x_t like x0 for given time steps t (int64 [B])."""
    # prob / alias are not read when DRAW=False; any pointers of the right kind will do.
    return _launch(x0, t, sqrt_ab, t, sqrt_ab, sqrt_1mab, seed, step, offset, draw=False)
