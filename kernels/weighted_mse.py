"""Triton kernels: weighted MSE against the regenerated noise, with its gradient, in one pass.

loss = mean_b w(t_b) mean_i (pred_bi - eps_bi)^2, mse_b = mean_i (pred_bi - eps_bi)^2 and
grad = d loss / d pred = (pred - eps) (2 / (B D)) w(t_b), computed while pred is read once;
eps comes from the same Philox counters as in sample_and_noise, in registers. Per-sample sums
are reduced in two stages (per-program partials, then one program in a fixed order), so the
result is deterministic. Tiling, layouts and device handling: `launch.py`.

    _weighted_mse_fwd_kernel, _weighted_mse_reduce_kernel -> weighted_mse_fwd (launcher)

The autograd wrapper is `speed_fast.ops.WeightedMSEFunction` (gradient kept for backward).
"""

import numpy as np
import torch
import triton
import triton.language as tl

from . import launch
from .rng import normal_quads, seed_keys

REDUCE_BLOCK_B = 64
REDUCE_BLOCK_P = 32
REDUCE_NUM_WARPS = 4


# The RNG coordinates change every step and T never matters for speed: no specialisation on them.
@triton.jit(do_not_specialize=["T", "seed", "step", "offset"])
def _weighted_mse_fwd_kernel(pred_ptr, grad_ptr, partial_ptr, t_ptr, w_ptr, T: tl.int32, D: tl.int32,
                             stride_b: tl.int64, c: tl.float32, seed: tl.uint64, step: tl.uint32, offset: tl.int64,
                             ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = b + offset
    k0, k1 = seed_keys(seed)
    t = tl.load(t_ptr + b)
    cw = c * tl.load(w_ptr + t, mask=(t >= 0) & (t < T), other=float("nan"))  # 2 w(t_b) / (B D)
    g0 = row * D
    phase = 0 if ALIGNED else (g0 % 4).to(tl.int32)
    src = pred_ptr + b * stride_b
    dst = grad_ptr + b * D
    lane = tl.arange(0, 4)[None, :]  # (1, 4)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)  # per counter: 4 lanes summed in registers
    for blk in range(tl.program_id(1), tl.cdiv(D + phase, 4 * BLOCK_C), tl.num_programs(1)):
        c_ = blk * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) counter within the sample
        eps = normal_quads(k0, k1, step, g0 // 4 + c_, 1.0, True)  # (BLOCK_C, 4)
        i = 4 * c_[:, None] + lane - phase  # (BLOCK_C, 4) element within the sample
        mask = i < D
        if not ALIGNED:
            mask &= i >= 0
        p = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, p - eps, 0.0)
        tl.store(dst + i, (d * cw).to(grad_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(d * d, axis=1)
    tl.store(partial_ptr + b * tl.num_programs(1) + tl.program_id(1), tl.sum(acc, axis=0))


@triton.jit
def _weighted_mse_reduce_kernel(partial_ptr, t_ptr, w_ptr, mse_ptr, loss_ptr, B: tl.int32, P: tl.int32, D: tl.int32,
                                T: tl.int32, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        in_b = rows < B
        acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            cols = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
            part = tl.load(partial_ptr + rows.to(tl.int64)[:, None] * P + cols[None, :],
                           mask=in_b[:, None] & (cols < P)[None, :], other=0.0)  # (BLOCK_B, BLOCK_P)
            acc += tl.sum(part, axis=1)
        mse = acc / D
        tl.store(mse_ptr + rows, mse, mask=in_b)
        t = tl.load(t_ptr + rows, mask=in_b, other=0)
        w = tl.load(w_ptr + t, mask=in_b & (t >= 0) & (t < T), other=float("nan"))
        total += tl.where(in_b, w * mse, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


def weighted_mse_fwd(pred: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, seed: int, step: int, offset: int):
    """(loss fp32 [], grad (contiguous, pred's dtype), mse fp32 [B]) for a batch pred [B, ...]."""
    pred = launch.batch(pred)
    B = pred.shape[0]
    D = pred[0].numel() if B else 0
    launch.check_sizes(B, D, offset)
    f32 = dict(dtype=torch.float32, device=pred.device)
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)  # (B, ...)
    if B == 0 or D == 0:  # means over empty sets, as the reference computes them
        mse = torch.full((B,), float("nan"), **f32)
        return (weights[t] * mse).mean(), grad, mse
    t = t.contiguous()
    aligned = D % 4 == 0
    grid = launch.grid(B, D, aligned)
    partial = torch.empty(grid, **f32)  # (B, P) per-program sums of (pred - eps)^2
    mse = torch.empty((B,), **f32)
    loss = torch.empty((), **f32)
    c = float(np.float32(2.0 / (B * D)))  # the reference's float32 factor (no tensor: nothing to read back)
    with launch.device_guard(pred):
        _weighted_mse_fwd_kernel[grid](pred, grad, partial, t, weights, weights.numel(), D, pred.stride(0), c, seed,
                                       step, offset, ALIGNED=aligned, BLOCK_C=launch.BLOCK_C,
                                       num_warps=launch.num_warps(aligned))
        _weighted_mse_reduce_kernel[(1,)](partial, t, weights, mse, loss, B, grid[1], D, weights.numel(),
                                          BLOCK_B=REDUCE_BLOCK_B, BLOCK_P=REDUCE_BLOCK_P,
                                          num_warps=REDUCE_NUM_WARPS)
    return loss, grad, mse


def compile_cases() -> list[launch.Case]:
    """Every constexpr variant a launch can compile (see `speed_fast.kernels.aot`)."""
    cases = []
    for dtype in launch.FLOAT_DTYPES:
        for aligned in (True, False):
            D = 4096 if aligned else 4099
            x = launch.Pointer(dtype, aligned)
            args = dict(pred_ptr=x, grad_ptr=x, partial_ptr=launch.Pointer(torch.float32),
                        t_ptr=launch.Pointer(torch.int64), w_ptr=launch.Pointer(torch.float32), T=1000, D=D,
                        stride_b=D, c=1e-6)
            cases.append(launch.Case("weighted_mse", launch.DTYPE_NAMES[dtype], "aligned" if aligned else "unaligned",
                                     _weighted_mse_fwd_kernel, args, dict(ALIGNED=aligned, BLOCK_C=launch.BLOCK_C),
                                     launch.num_warps(aligned), 4 * launch.BLOCK_C))
    args = dict(partial_ptr=launch.Pointer(torch.float32), t_ptr=launch.Pointer(torch.int64),
                w_ptr=launch.Pointer(torch.float32), mse_ptr=launch.Pointer(torch.float32),
                loss_ptr=launch.Pointer(torch.float32), B=256, P=2, D=4096, T=1000)
    cases.append(launch.Case("weighted_mse_reduce", "fp32", "", _weighted_mse_reduce_kernel, args,
                             dict(BLOCK_B=REDUCE_BLOCK_B, BLOCK_P=REDUCE_BLOCK_P), REDUCE_NUM_WARPS))
    return cases
