"""The triton backend: the fused ops as Triton kernels (sources in `kernels/`).

Runs on CUDA tensors; with TRITON_INTERPRET=1 set before triton is first
imported, the same kernels run in Triton's interpreter on CPU tensors (slow,
for tests on machines without a GPU). Each op is a torch custom op
(`torch.ops.speed_fast.triton_*`, with fake implementations), so torch.compile
and DeepSpeed treat it as one opaque, shape-known tensor op.
"""

from __future__ import annotations

import torch


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from speed_fast.kernels.sample_and_noise import _sample_and_noise_fwd_kernel

    return isinstance(_sample_and_noise_fwd_kernel, InterpretedFunction)


def available() -> tuple[bool, str]:
    try:
        import triton

        interpreting = _interpreting()
    except ImportError as exc:
        return False, f"triton is not importable ({exc}); install the 'gpu' extra"
    if interpreting:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, correctness only"
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, ("no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels in its "
                   "interpreter)")


def _seed_bits(seed: int) -> int:
    """The uint64 seed's bit pattern as an int64 (torch op schemas have no unsigned ints)."""
    return seed - 2**64 if seed >= 2**63 else seed


def _seed(bits: int) -> int:
    return bits % 2**64


@torch.library.custom_op("speed_fast::triton_sample_timesteps", mutates_args=())
def _sample_timesteps_op(prob: torch.Tensor, alias: torch.Tensor, n: int, seed: int, step: int,
                         offset: int) -> torch.Tensor:
    from speed_fast.kernels.sample_timesteps import sample_timesteps_fwd

    return sample_timesteps_fwd(prob, alias, n, _seed(seed), step, offset)


@_sample_timesteps_op.register_fake
def _(prob, alias, n, seed, step, offset):
    return prob.new_empty((n,), dtype=torch.int64)


@torch.library.custom_op("speed_fast::triton_sample_and_noise", mutates_args=())
def _sample_and_noise_op(x0: torch.Tensor, prob: torch.Tensor, alias: torch.Tensor, sqrt_ab: torch.Tensor,
                         sqrt_1mab: torch.Tensor, seed: int, step: int,
                         offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    from speed_fast.kernels.sample_and_noise import sample_and_noise_fwd

    return sample_and_noise_fwd(x0, prob, alias, sqrt_ab, sqrt_1mab, _seed(seed), step, offset)


@_sample_and_noise_op.register_fake
def _(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset):
    return x0.new_empty((x0.shape[0],), dtype=torch.int64), x0.new_empty(x0.shape)


@torch.library.custom_op("speed_fast::triton_add_noise", mutates_args=())
def _add_noise_op(x0: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int,
                  step: int, offset: int) -> torch.Tensor:
    from speed_fast.kernels.sample_and_noise import add_noise_fwd

    return add_noise_fwd(x0, t, sqrt_ab, sqrt_1mab, _seed(seed), step, offset)


@_add_noise_op.register_fake
def _(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("speed_fast::triton_weighted_mse_fwd", mutates_args=())
def _weighted_mse_fwd_op(pred: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, seed: int, step: int,
                         offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from speed_fast.kernels.weighted_mse import weighted_mse_fwd

    return weighted_mse_fwd(pred, t, weights, _seed(seed), step, offset)


@_weighted_mse_fwd_op.register_fake
def _(pred, t, weights, seed, step, offset):
    f32 = dict(dtype=torch.float32, device=pred.device)
    return pred.new_empty((), **f32), pred.new_empty(pred.shape), pred.new_empty((pred.shape[0],), **f32)


# Backend interface (see speed_fast/ops/backends.py).


def sample_timesteps(prob, alias, n, seed, step, offset=0):
    return _sample_timesteps_op(prob.contiguous(), alias.contiguous(), n, _seed_bits(seed), step, offset)


def add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    return _add_noise_op(x0.contiguous(), t.contiguous(), sqrt_ab.contiguous(), sqrt_1mab.contiguous(),
                         _seed_bits(seed), step, offset)


def sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    return _sample_and_noise_op(x0.contiguous(), prob.contiguous(), alias.contiguous(), sqrt_ab.contiguous(),
                                sqrt_1mab.contiguous(), _seed_bits(seed), step, offset)


def weighted_mse_fwd(pred, t, weights, seed, step, offset=0):
    return _weighted_mse_fwd_op(pred.contiguous(), t.contiguous(), weights.contiguous(), _seed_bits(seed), step,
                                offset)
