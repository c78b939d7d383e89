"""The counter-based RNG every backend shares (torch reference).

Philox4x32-10 exactly as Triton's `tl.randint4x` computes it, so that the same
(seed, step) gives the same time steps (bit-exact) and the same noise (to
float32 rounding of log/sin/cos) on torch, C++ and Triton:

    key     = (seed & 0xffffffff, seed >> 32)             seed in [0, 2^64)
    counter = (index & 0xffffffff, index >> 32, step, stream)   step in [0, 2^32)

Streams: NOISE (0) and TIMESTEPS (1).

* noise: element i of a batch whose first sample has global index `offset`
  (so ranks of a data-parallel job draw disjoint noise) uses global element
  g = offset * numel_per_sample + i, Philox counter index g >> 2, and takes
  lane g & 3 of two Box-Muller pairs (u0, u1) -> (n0, n1), (u2, u3) -> (n2, n3),
  n = sqrt(-2 ln max(u_a, 1e-7)) * (cos | sin)(2 pi u_b).
* time steps: draw b uses counter index offset + b; column c = (r0 * T) >> 32
  (exact integer arithmetic), coin u = uniform(r1).

uniform(r) is Triton's `uint_to_uniform_float`: reinterpret r as int32, map
negatives x -> ~x, convert to float32, multiply by float32(4.6566127342e-10).
"""

from __future__ import annotations

import operator

import torch

NOISE = 0
TIMESTEPS = 1

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
BOX_MULLER_MIN_U = 1.0e-7
TWO_PI = 6.283185307179586

_M32 = 0xFFFFFFFF


SEED_LIMIT = 2**64  # seed in [0, 2^64): the Philox key
STEP_LIMIT = 2**32  # step in [0, 2^32): one counter word
OFFSET_LIMIT = 2**62  # offset in [0, 2^62): element indices offset * numel stay below 2^63


def _check_int(name: str, value, limit: int) -> int:
    if isinstance(value, (bool, float, torch.Tensor)) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = operator.index(value)
    if not 0 <= value < limit:
        raise ValueError(f"{name} must be in [0, {limit}), got {value!r}")
    return value


def check_seed(seed) -> int:
    """A seed in [0, 2^64) as a Python int (checked once per run: the trainer's config, FusedSpeeD)."""
    return _check_int("seed", seed, SEED_LIMIT)


def check_step_offset(step, offset=0) -> tuple[int, int]:
    """The per-call RNG coordinates (step in [0, 2^32), offset in [0, 2^62)) as Python ints."""
    if torch.compiler.is_compiling():  # traced (step may be symbolic): the compiled ops check ranges at run time
        return step, offset
    return _check_int("step", step, STEP_LIMIT), _check_int("offset", offset, OFFSET_LIMIT)


def check_seed_step(seed, step, offset=0) -> tuple[int, int, int]:
    """Validate the RNG coordinates of one call of a functional op; returns them as Python ints."""
    if torch.compiler.is_compiling():
        return seed, step, offset
    return (check_seed(seed), *check_step_offset(step, offset))


def seed_bits(seed: int) -> int:
    """The uint64 seed's bit pattern as an int64 (torch op schemas have no unsigned ints)."""
    return seed - 2**64 if seed >= 2**63 else seed


def seed_from_bits(bits: int) -> int:
    """The inverse of `seed_bits`: the uint64 seed of an int64 bit pattern."""
    return bits % 2**64


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a < 2^32 and b in [0, 2^32),
    computed in int64 without overflow by splitting b into 16-bit halves."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & _M32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns four such tensors."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def random_uint32x4(index: torch.Tensor, seed: int, step: int, stream: int):
    """Four uint32 words (as int64) per counter index (int64 tensor, >= 0)."""
    c0 = index & _M32
    c1 = index >> 32
    c2 = torch.full_like(index, step)
    c3 = torch.full_like(index, stream)
    return philox4x32(c0, c1, c2, c3, seed & _M32, (seed >> 32) & _M32)


def uniform(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for uint32 words held in int64: float32 in [0, 1)."""
    folded = torch.where(r >= 2**31, _M32 - r, r)  # the int32 reinterpretation, negatives x -> ~x
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal, in float32."""
    u_a = torch.clamp_min(u_a, BOX_MULLER_MIN_U)
    th = torch.tensor(TWO_PI, dtype=torch.float32) * u_b
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u_a))
    return r * torch.cos(th), r * torch.sin(th)


def normal_ref(numel: int, seed: int, step: int, first_element: int = 0, device=None) -> torch.Tensor:
    """float32 [numel]: the standard normals for global elements first_element .. first_element + numel - 1,
    computed on `device` (default CPU), so a GPU reference needs no host-to-device copy."""
    seed, step, _ = check_seed_step(seed, step)
    if numel < 0 or first_element < 0:
        raise ValueError(f"numel and first_element must be >= 0, got {numel!r} and {first_element!r}")
    g = torch.arange(first_element, first_element + numel, dtype=torch.int64, device=device)
    r0, r1, r2, r3 = random_uint32x4(g >> 2, seed, step, NOISE)
    n0, n1 = box_muller(uniform(r0), uniform(r1))
    n2, n3 = box_muller(uniform(r2), uniform(r3))
    lanes = torch.stack([n0, n1, n2, n3], dim=1)  # (numel, 4)
    return lanes.gather(1, (g & 3).unsqueeze(1)).squeeze(1)


def alias_draws_ref(n: int, T: int, seed: int, step: int, offset: int = 0,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(column int64 [n], coin float32 [n]) for draws offset .. offset + n - 1, computed on `device`."""
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    r0, r1, _, _ = random_uint32x4(index, seed, step, TIMESTEPS)
    column, _ = _mulhilo(T, r0)  # floor(r0 * T / 2^32), exact
    return column, uniform(r1)
