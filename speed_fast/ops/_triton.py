"""The triton backend: the fused ops as Triton kernels (sources and launchers in `kernels/`).

Runs on CUDA tensors; with TRITON_INTERPRET=1 set before triton is first imported, the same
kernels run in Triton's interpreter on CPU tensors (slow, for tests on machines without a GPU).
Each op is a torch custom op (`torch.ops.speed_fast.triton_*`, with fake implementations), so
torch.compile and DeepSpeed treat it as one opaque, shape-known tensor op.

`available()` is true only after a tiny real launch of every kernel on the current device (or in
the interpreter) gave the torch reference's t exactly and its eps to 1e-5: a kernel that does not
compile for this GPU, or whose fast math is off on it, makes the backend unavailable with the
reason, instead of failing (or drifting) at the first training step.
"""

from __future__ import annotations

import torch

from ..rng import seed_bits
from ..rng import seed_from_bits as _seed
from .backends import interpreting


@torch.library.custom_op("speed_fast::triton_sample_timesteps", mutates_args=())
def _sample_timesteps_op(prob: torch.Tensor, alias: torch.Tensor, n: int, seed: int, step: int,
                         offset: int) -> torch.Tensor:
    from speed_fast.kernels.sample_timesteps import sample_timesteps_fwd

    return sample_timesteps_fwd(prob.contiguous(), alias.contiguous(), n, _seed(seed), step, offset)


@_sample_timesteps_op.register_fake
def _(prob, alias, n, seed, step, offset):
    return prob.new_empty((n,), dtype=torch.int64)


@torch.library.custom_op("speed_fast::triton_sample_and_noise", mutates_args=())
def _sample_and_noise_op(x0: torch.Tensor, prob: torch.Tensor, alias: torch.Tensor, sqrt_ab: torch.Tensor,
                         sqrt_1mab: torch.Tensor, seed: int, step: int,
                         offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    from speed_fast.kernels.sample_and_noise import sample_and_noise_fwd

    return sample_and_noise_fwd(x0, prob.contiguous(), alias.contiguous(), sqrt_ab.contiguous(),
                                sqrt_1mab.contiguous(), _seed(seed), step, offset)


@_sample_and_noise_op.register_fake
def _(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset):
    return x0.new_empty((x0.shape[0],), dtype=torch.int64), x0.new_empty(x0.shape)


@torch.library.custom_op("speed_fast::triton_add_noise", mutates_args=())
def _add_noise_op(x0: torch.Tensor, t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int,
                  step: int, offset: int) -> torch.Tensor:
    from speed_fast.kernels.sample_and_noise import add_noise_fwd

    return add_noise_fwd(x0, t, sqrt_ab.contiguous(), sqrt_1mab.contiguous(), _seed(seed), step, offset)


@_add_noise_op.register_fake
def _(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("speed_fast::triton_weighted_mse_fwd", mutates_args=())
def _weighted_mse_fwd_op(pred: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, seed: int, step: int,
                         offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from speed_fast.kernels.weighted_mse import weighted_mse_fwd

    return weighted_mse_fwd(pred, t, weights.contiguous(), _seed(seed), step, offset)


@_weighted_mse_fwd_op.register_fake
def _(pred, t, weights, seed, step, offset):
    f32 = dict(dtype=torch.float32, device=pred.device)
    return pred.new_empty((), **f32), pred.new_empty(pred.shape), pred.new_empty((pred.shape[0],), **f32)


# Backend interface (see speed_fast/ops/backends.py).


def sample_timesteps(prob, alias, n, seed, step, offset=0):
    return _sample_timesteps_op(prob, alias, n, seed_bits(seed), step, offset)


def add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    return _add_noise_op(x0, t, sqrt_ab, sqrt_1mab, seed_bits(seed), step, offset)


def sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    return _sample_and_noise_op(x0, prob, alias, sqrt_ab, sqrt_1mab, seed_bits(seed), step, offset)


def weighted_mse_fwd(pred, t, weights, seed, step, offset=0):
    return _weighted_mse_fwd_op(pred, t, weights, seed_bits(seed), step, offset)


def probe(device) -> None:
    """Launch every kernel once on tiny inputs on `device` and compare with the torch reference
    (t exactly, eps to 1e-5, the loss of pred = eps exactly 0); raises on any difference."""
    from ..alias import build_alias_table
    from ..rng import normal_ref
    from .sample_timesteps import sample_timesteps_ref

    prob, alias = build_alias_table(torch.arange(1.0, 8.0))
    ones, zeros = torch.ones(7), torch.zeros(7)
    seed, step, offset = 2**64 - 3, 2**32 - 5, 2**31 + 7  # every word of the RNG coordinates in use
    on = dict(device=device)
    draws = sample_timesteps(prob.to(**on), alias.to(**on), 37, seed, step, offset)
    want = sample_timesteps_ref(prob, alias, 37, seed, step, offset)
    if not torch.equal(draws.cpu(), want):
        raise RuntimeError(f"sample_timesteps drew {draws.cpu().tolist()}, the reference {want.tolist()}")
    for shape in ((3, 4, 8, 8), (2, 3, 5)):  # a numel per sample on counter boundaries, and one off them
        x0 = torch.zeros(shape, **on)
        t, eps = sample_and_noise(x0, prob.to(**on), alias.to(**on), zeros.to(**on), ones.to(**on), seed, step, offset)
        numel = x0[0].numel()
        eps_ref = normal_ref(x0.numel(), seed, step, first_element=offset * numel).view(shape)
        t_ref = sample_timesteps_ref(prob, alias, shape[0], seed, step, offset)
        if not torch.equal(t.cpu(), t_ref):
            raise RuntimeError(f"sample_and_noise drew t = {t.cpu().tolist()}, the reference {t_ref.tolist()}")
        err = float((eps.cpu() - eps_ref).abs().max())
        if not err <= 1e-5:
            raise RuntimeError(f"sample_and_noise's eps differs from the reference by {err:.3g} (allowed 1e-5)")
        loss, _, mse = weighted_mse_fwd(eps, t, ones.to(**on), seed, step, offset)
        if float(loss) != 0.0 or float(mse.abs().max()) != 0.0:
            raise RuntimeError(f"weighted_mse of pred = eps is {float(loss):.3g}, not 0: the two kernels' noise "
                               "differs")


def available() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not importable ({exc}); install the 'gpu' extra"
    if interpreting():
        device, where = torch.device("cpu"), f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU " \
                                             "tensors, correctness only"
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        where = f"Triton {triton.__version__} on {torch.cuda.get_device_name(device)}"
    else:
        return False, ("no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels in its "
                       "interpreter)")
    try:
        probe(device)
    except Exception as exc:  # the reason travels to the warning / BackendUnavailable
        return False, f"{where}: a test launch failed: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:3000]
    return True, f"{where}; a test launch matched the torch reference"
