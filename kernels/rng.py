"""Triton device functions of the counter-based RNG shared by the fused kernels.

They compute what `speed_fast.rng` (the torch reference) defines: Philox4x32-10 with
key = (seed lo32, seed hi32) and counter = (index lo32, index hi32, step, stream), stream 0
for noise and 1 for time steps; Triton's uint-to-uniform conversion; Box-Muller.

Compiled for a GPU, the transcendental functions of Box-Muller run on the special function
unit (MUFU lg2 / sin / cos / sqrt, a few instructions each instead of libdevice's ~40 with a
slow path), rearranged so that their documented error bounds keep eps within ~1e-5 of the
reference:

* sin/cos take theta - pi = 2 pi u - pi in [-pi, pi) (one fma from the integer word), where
  __sinf/__cosf are accurate to 2^-21.4 absolute; the sign flip goes into the radius. Its
  rounding differs from the reference's float32 angle by at most 3.3e-7.
* -ln(u) comes from lg2 (2^-22 absolute near 1, 2 ulp elsewhere) except for u > 1 - 1/64,
  where the radius sqrt(-2 ln u) would amplify an absolute error: there the series
  w + w^2/2 + w^3/3 of -ln(1 - w), w = 1 - u (exact), is used (relative error < w^3/4).

Under Triton's interpreter (TRITON_INTERPRET=1, no GPU) the same arrangement runs with
numpy's log2/sin/cos in place of the MUFU instructions, so the tests check everything but
the hardware approximations themselves; `speed_fast.ops` checks those against the
reference once per process before it lets the triton backend run (see `_triton.probe`).
"""

import triton
import triton.language as tl
from triton import knobs

INTERPRET = tl.constexpr(bool(knobs.runtime.interpret))

NOISE = tl.constexpr(0)
TIMESTEPS = tl.constexpr(1)
ROUND_A = tl.constexpr(0xD2511F53)
ROUND_B = tl.constexpr(0xCD9E8D57)
KEY_A = tl.constexpr(0x9E3779B9)
KEY_B = tl.constexpr(0xBB67AE85)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
MIN_U = tl.constexpr(1.0e-7)
ANGLE_SCALE = tl.constexpr(2.9258361e-09)  # float32(UNIFORM_SCALE * float32(2 pi))
NEG_PI = tl.constexpr(-3.1415927410125732)  # float32(-pi)
NEG_2LN2 = tl.constexpr(-1.3862943611198906)
SERIES_BELOW = tl.constexpr(0.015625)  # w = 1 - u under which -ln(u) comes from the series


@triton.jit
def _lg2(x):
    if INTERPRET:
        y = tl.log2(x)
    else:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def _sin(x):
    if INTERPRET:
        y = tl.sin(x)
    else:
        y = tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def _cos(x):
    if INTERPRET:
        y = tl.cos(x)
    else:
        y = tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def _mul_rn(x, y):
    """x * y rounded to float32 on its own, never contracted into a later add (an fma)."""
    if INTERPRET:
        z = x * y
    else:
        z = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return z


@triton.jit
def seed_keys(seed):
    """The Philox key (k0, k1), uint32, of a seed in [0, 2^64)."""
    seed = seed.to(tl.uint64)
    return (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def philox(k0, k1, c0, c1, c2, c3):
    """Philox4x32-10 of uint32 counter words (c0, c1, c2, c3) under the key (k0, k1)."""
    for _ in tl.static_range(10):
        # 32 x 32 -> 64-bit products: one wide multiply each gives both halves.
        pb = c2.to(tl.uint64) * ROUND_B
        pa = c0.to(tl.uint64) * ROUND_A
        c0, c1, c2, c3 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0, pb.to(tl.uint32), (pa >> 32).to(tl.uint32) ^ c3 ^ k1, \
            pa.to(tl.uint32)
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return c0, c1, c2, c3


@triton.jit
def _words(k0, k1, step, index, stream: tl.constexpr):
    """Four uint32 words of counter `index` (int64, >= 0) of `stream` at `step` (uint32)."""
    c0 = index.to(tl.uint32)  # low word (truncation)
    c1 = (index >> 32).to(tl.uint32)
    zero = c0 * 0
    return philox(k0, k1, c0, c1, zero + step.to(tl.uint32), zero + stream)


@triton.jit
def uniform(r):
    """Triton's uint_to_uniform_float: r as int32, negatives x -> ~x, times 2^-31 (float32)."""
    x = r.to(tl.int32, bitcast=True)
    x = x ^ (x >> 31)  # arithmetic shift: ~x for x < 0, x otherwise
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def box_muller(ra, rb, scale, EXACT: tl.constexpr):
    """scale times the normal pair (r cos theta, r sin theta) of two uint32 words:
    r = sqrt(-2 ln max(u_a, 1e-7)), theta = 2 pi u_b (evaluated as the module docstring says).
    EXACT: each value rounded to float32 on its own, so that pred - eps of a pred equal to eps
    is exactly 0 (the compiler would otherwise fuse the product into that subtraction)."""
    ua = tl.maximum(uniform(ra), MIN_U)
    w = 1.0 - ua  # exact: ua >= 1/2 wherever the series is used
    series = w * (2.0 + w * (1.0 + w * 0.6666666666666666))  # -2 ln(1 - w)
    neg_2ln = tl.where(w < SERIES_BELOW, series, _lg2(ua) * NEG_2LN2)
    radius = -scale * tl.sqrt(neg_2ln)  # the minus sign undoes theta - pi below
    rb = rb.to(tl.int32, bitcast=True)
    theta = tl.fma((rb ^ (rb >> 31)).to(tl.float32), ANGLE_SCALE, NEG_PI)  # 2 pi u_b - pi, one rounding
    if EXACT:
        n0, n1 = _mul_rn(radius, _cos(theta)), _mul_rn(radius, _sin(theta))
    else:
        n0, n1 = radius * _cos(theta), radius * _sin(theta)
    return n0, n1


@triton.jit
def alias_draw(prob_ptr, alias_ptr, T, k0, k1, step, index):
    """int64 time step of draw `index` (int64): column c = (r0 T) >> 32, t = c if uniform(r1) < prob[c]
    else alias[c]."""
    r0, r1, _, _ = _words(k0, k1, step, index, TIMESTEPS)
    column = tl.umulhi(r0, T.to(tl.uint32))  # < T
    keep = tl.load(prob_ptr + column)
    other = tl.load(alias_ptr + column)
    return tl.where(uniform(r1) < keep, column.to(tl.int64), other.to(tl.int64))


@triton.jit
def normal_quads(k0, k1, step, counter, scale, EXACT: tl.constexpr):
    """float32 (BLOCK_C, 4): scale times the normals of Philox counters `counter` (int64 (BLOCK_C,)); [c, k]
    is lane k of counter c, i.e. global element 4 counter[c] + k (EXACT: see box_muller)."""
    r0, r1, r2, r3 = _words(k0, k1, step, counter, NOISE)
    n0, n1 = box_muller(r0, r1, scale, EXACT)
    n2, n3 = box_muller(r2, r3, scale, EXACT)
    k = tl.arange(0, 4)[None, :]  # (1, 4): a constant in each register, so the selects fold away
    return tl.where(k == 0, n0[:, None], tl.where(k == 1, n1[:, None], tl.where(k == 2, n2[:, None], n3[:, None])))
