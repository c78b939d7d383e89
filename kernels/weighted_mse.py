"""Triton kernels: weighted MSE against the regenerated noise, with its gradient, in one pass.

loss = mean_b w(t_b) mean_i (pred_bi - eps_bi)^2, mse_b = mean_i (pred_bi - eps_bi)^2 and
grad = d loss / d pred = (pred - eps) * (2 / (B D)) * w(t_b), computed while pred is read
once; eps comes from the same Philox counters as in sample_and_noise, in registers.
Per-sample sums are reduced in two stages (per-program partials, then one program in a
fixed order), so the result is deterministic.

    _weighted_mse_fwd_kernel, _weighted_mse_reduce_kernel -> weighted_mse_fwd (launcher)

The autograd wrapper is `speed_fast.ops.WeightedMSEFunction` (gradient kept for backward).
"""

import torch
import triton
import triton.language as tl

from .rng import normal_block
from .sample_and_noise import _grid


# The RNG coordinates change every step: no recompilation for their values.
@triton.jit(do_not_specialize=["seed", "step", "offset"])
def _weighted_mse_fwd_kernel(pred_ptr, grad_ptr, partial_ptr, t_ptr, w_ptr, T, D, P, c, seed, step, offset,
                             BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b + offset
    t = tl.load(t_ptr + b)
    w = tl.load(w_ptr + t, mask=(t >= 0) & (t < T), other=float("nan"))
    g0 = row * D
    first_counter = g0 // 4 + pid * BLOCK_C
    eps = normal_block(seed, step, first_counter, BLOCK_C)  # (4 BLOCK_C,)
    g = first_counter * 4 + tl.arange(0, 4 * BLOCK_C)
    mask = (g >= g0) & (g < g0 + D)
    idx = b * D + (g - g0)
    p = tl.load(pred_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, p - eps, 0.0)
    tl.store(grad_ptr + idx, ((d * c) * w).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * P + pid, tl.sum(d * d, axis=0))


@triton.jit
def _weighted_mse_reduce_kernel(partial_ptr, t_ptr, w_ptr, mse_ptr, loss_ptr, B, P, D, T, BLOCK_B: tl.constexpr,
                                BLOCK_P: tl.constexpr):
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        in_b = rows < B
        acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            cols = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
            part = tl.load(partial_ptr + rows[:, None] * P + cols[None, :], mask=in_b[:, None] & (cols < P)[None, :],
                           other=0.0)  # (BLOCK_B, BLOCK_P)
            acc += tl.sum(part, axis=1)
        mse = acc / D
        tl.store(mse_ptr + rows, mse, mask=in_b)
        t = tl.load(t_ptr + rows, mask=in_b, other=0)
        w = tl.load(w_ptr + t, mask=in_b & (t >= 0) & (t < T), other=float("nan"))
        total += tl.where(in_b, w * mse, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


def weighted_mse_fwd(pred: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, seed: int, step: int, offset: int):
    """(loss fp32 [], grad like pred, mse fp32 [B]) for a contiguous batch pred [B, ...]."""
    B = pred.shape[0]
    D = pred.numel() // B if B else 0
    f32 = dict(dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred)  # (B, ...)
    if B == 0 or D == 0:  # means over empty sets, as the reference computes them
        mse = torch.full((B,), float("nan"), **f32)
        return (weights[t] * mse).mean(), grad, mse
    grid, block_c = _grid(D, B)
    P = grid[0]
    partial = torch.empty((B, P), **f32)  # (B, P) per-program sums of (pred - eps)^2
    mse = torch.empty((B,), **f32)
    loss = torch.empty((), **f32)
    c = float(torch.tensor(2.0 / (B * D), dtype=torch.float32))  # the reference's float32 factor
    _weighted_mse_fwd_kernel[grid](pred, grad, partial, t, weights, weights.numel(), D, P, c, seed, step, offset,
                                   BLOCK_C=block_c)
    _weighted_mse_reduce_kernel[(1,)](partial, t, weights, mse, loss, B, P, D, weights.numel(),
                                      BLOCK_B=min(128, triton.next_power_of_2(B)),
                                      BLOCK_P=min(64, triton.next_power_of_2(P)))
    return loss, grad, mse
