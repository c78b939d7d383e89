"""Triton device functions of the counter-based RNG shared by the fused kernels.

They compute exactly what `speed_fast.rng` (the torch reference) defines, with
Triton's own Philox, `uint_to_uniform_float` and `pair_uniform_to_normal`:
key = (seed lo32, seed hi32), counter = (index lo32, index hi32, step, stream),
stream 0 for noise, 1 for time steps.
"""

import triton
import triton.language as tl

NOISE = tl.constexpr(0)
TIMESTEPS = tl.constexpr(1)


@triton.jit
def _philox(seed, step, index, stream: tl.constexpr):
    """Four uint32 words for each counter index (int64, >= 0) of `stream` at `step`."""
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = (index >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.random.philox(seed, c0, c1, zero + tl.cast(step, tl.uint32), zero + stream)


@triton.jit
def alias_draw(prob_ptr, alias_ptr, T, seed, step, index):
    """int64 time steps of draws `index` (int64): column c = (r0 T) >> 32, t = c if
    uniform(r1) < prob[c] else alias[c]."""
    r0, r1, _, _ = _philox(seed, step, index, TIMESTEPS)
    column = tl.umulhi(r0, tl.cast(T, tl.uint32))  # < T
    coin = tl.random.uint_to_uniform_float(r1)
    keep = tl.load(prob_ptr + column)
    other = tl.load(alias_ptr + column)
    return tl.where(coin < keep, column.to(tl.int64), other.to(tl.int64))


@triton.jit
def normal_block(seed, step, first_counter, BLOCK_C: tl.constexpr):
    """float32 (4 BLOCK_C,): the normals of global elements 4 first_counter .. + 4 BLOCK_C - 1,
    in element order (element 4 c + k is lane k of counter c)."""
    counter = first_counter + tl.arange(0, BLOCK_C)  # (BLOCK_C,) int64
    r0, r1, r2, r3 = _philox(seed, step, counter, NOISE)
    n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0),
                                              tl.random.uint_to_uniform_float(r1))
    n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r2),
                                              tl.random.uint_to_uniform_float(r3))
    # join(join(n0, n2), join(n1, n3))[c, i, j] is lane 2 i + j of counter c.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (4 * BLOCK_C,))
