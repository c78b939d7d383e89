"""Triton kernel: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps in one pass over x0.

The time step of each sample is drawn in the same kernel (alias method) unless given; eps is
generated in registers (Philox + Box-Muller, `rng.py`) and never written to memory. Tiling,
layouts and device handling: `launch.py`.

    _sample_and_noise_fwd_kernel -> sample_and_noise_fwd / add_noise_fwd (launchers)
"""

import torch
import triton
import triton.language as tl

from . import launch
from .rng import alias_draw, normal_quads, seed_keys
from .sample_timesteps import sample_timesteps_fwd


# The RNG coordinates change every step and T never matters for speed: no specialisation on them.
@triton.jit(do_not_specialize=["T", "seed", "step", "offset"])
def _sample_and_noise_fwd_kernel(x0_ptr, xt_ptr, t_ptr, prob_ptr, alias_ptr, sqrt_ab_ptr, sqrt_1mab_ptr, T: tl.int32,
                                 D: tl.int32, stride_b: tl.int64, seed: tl.uint64, step: tl.uint32,
                                 offset: tl.int64, DRAW: tl.constexpr, ALIGNED: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = b + offset  # global sample index
    k0, k1 = seed_keys(seed)
    if DRAW:
        t = alias_draw(prob_ptr, alias_ptr, T, k0, k1, step, row)
        tl.store(t_ptr + b, t, mask=tl.program_id(1) == 0)
    else:
        t = tl.load(t_ptr + b)
    valid = (t >= 0) & (t < T)  # a corrupt t gives NaN, never an out-of-bounds read
    a = tl.load(sqrt_ab_ptr + t, mask=valid, other=float("nan"))
    s = tl.load(sqrt_1mab_ptr + t, mask=valid, other=float("nan"))
    g0 = row * D  # global index of the sample's first element
    phase = 0 if ALIGNED else (g0 % 4).to(tl.int32)  # its lane within its Philox counter
    src = x0_ptr + b * stride_b
    dst = xt_ptr + b * D
    lane = tl.arange(0, 4)[None, :]  # (1, 4)
    for blk in range(tl.program_id(1), tl.cdiv(D + phase, 4 * BLOCK_C), tl.num_programs(1)):
        c = blk * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) counter within the sample
        s_eps = normal_quads(k0, k1, step, g0 // 4 + c, s, False)  # (BLOCK_C, 4) sqrt(1 - abar_t) eps
        i = 4 * c[:, None] + lane - phase  # (BLOCK_C, 4) element within the sample
        mask = i < D
        if not ALIGNED:
            mask &= i >= 0
        x = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + i, (a * x + s_eps).to(xt_ptr.dtype.element_ty), mask=mask)


def _launch(x0, xt, t, prob, alias, sqrt_ab, sqrt_1mab, seed: int, step: int, offset: int, draw: bool) -> None:
    B = x0.shape[0]
    D = x0[0].numel()
    aligned = D % 4 == 0
    with launch.device_guard(x0):
        _sample_and_noise_fwd_kernel[launch.grid(B, D, aligned)](
            x0, xt, t, prob, alias, sqrt_ab, sqrt_1mab, sqrt_ab.numel(), D, x0.stride(0), seed, step, offset,
            DRAW=draw, ALIGNED=aligned, BLOCK_C=launch.BLOCK_C, num_warps=launch.num_warps(aligned))


def sample_and_noise_fwd(x0, prob, alias, sqrt_ab, sqrt_1mab, seed: int, step: int, offset: int):
    """(t int64 [B], x_t): time steps from the alias table, then the noised batch (contiguous, x0's dtype)."""
    x0 = launch.batch(x0)
    B, D = x0.shape[0], x0[0].numel() if x0.shape[0] else 0
    launch.check_sizes(B, D, offset)
    xt = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)  # (B, ...)
    if B == 0 or D == 0:  # nothing to noise: the draws alone
        return sample_timesteps_fwd(prob, alias, B, seed, step, offset), xt
    t = torch.empty(B, dtype=torch.int64, device=x0.device)  # (B,) written by the kernel
    _launch(x0, xt, t, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset, draw=True)
    return t, xt


def add_noise_fwd(x0, t, sqrt_ab, sqrt_1mab, seed: int, step: int, offset: int) -> torch.Tensor:
    """x_t (contiguous, x0's dtype) for given time steps t (int64 [B])."""
    x0 = launch.batch(x0)
    B, D = x0.shape[0], x0[0].numel() if x0.shape[0] else 0
    launch.check_sizes(B, D, offset)
    xt = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)  # (B, ...)
    if B and D:
        # prob / alias are not read when DRAW=False; the tables stand in for them.
        _launch(x0, xt, t.contiguous(), sqrt_ab, t, sqrt_ab, sqrt_1mab, seed, step, offset, draw=False)
    return xt


def compile_cases() -> list[launch.Case]:
    """Every constexpr variant a launch can compile (see `speed_fast.kernels.aot`)."""
    cases = []
    for dtype in launch.FLOAT_DTYPES:
        for draw in (True, False):
            for aligned in (True, False):
                D = 4096 if aligned else 4099  # a sample of 4 x 32 x 32, or one off counter boundaries
                x = launch.Pointer(dtype, aligned)
                args = dict(x0_ptr=x, xt_ptr=x, t_ptr=launch.Pointer(torch.int64),
                            prob_ptr=launch.Pointer(torch.float32),
                            alias_ptr=launch.Pointer(torch.int32 if draw else torch.int64),
                            sqrt_ab_ptr=launch.Pointer(torch.float32), sqrt_1mab_ptr=launch.Pointer(torch.float32),
                            T=1000, D=D, stride_b=D)
                cases.append(launch.Case("sample_and_noise" if draw else "add_noise", launch.DTYPE_NAMES[dtype],
                                         "aligned" if aligned else "unaligned", _sample_and_noise_fwd_kernel, args,
                                         dict(DRAW=draw, ALIGNED=aligned, BLOCK_C=launch.BLOCK_C),
                                         launch.num_warps(aligned), 4 * launch.BLOCK_C))
    return cases
