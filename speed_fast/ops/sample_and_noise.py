"""sample_and_noise / add_noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps in one pass over x0.

    t, x_t = sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset=0)
    x_t = add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset=0)

sample_and_noise draws t_b by the alias method (as `sample_timesteps`, draw index offset + b)
in the same pass. eps is regenerated, never stored: element i of a batch whose first sample is
global sample `offset` is the normal of global element offset * numel_per_sample + i
(`speed_fast.rng`), so `weighted_mse` at the same (seed, step, offset) sees the same eps. x_t is
computed in float32 and returned in x0's dtype, contiguous, whatever x0's layout. x0 gets a
gradient (grad_x_t sqrt(abar_t)) when it requires one.
"""

from __future__ import annotations

import math

import torch

from .. import rng
from . import backends
from .sample_timesteps import sample_timesteps_ref
from .validate import check_alias_table, check_batch, check_on, check_seed_step, check_t, check_table


def noise_ref(shape, seed: int, step: int, offset: int, device) -> torch.Tensor:
    """float32 eps of a contiguous batch of `shape` whose first sample is global sample `offset`."""
    per_sample = math.prod(shape[1:])
    return rng.normal_ref(shape[0] * per_sample, seed, step, first_element=offset * per_sample,
                          device=device).view(shape)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)


def add_noise_ref(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset=0) -> torch.Tensor:
    """The torch reference of add_noise."""
    eps = noise_ref(x0.shape, seed, step, offset, x0.device)
    a = _per_sample(sqrt_ab[t], x0)
    s = _per_sample(sqrt_1mab[t], x0)
    return (a * x0.float() + s * eps).to(x0.dtype).contiguous()


def sample_and_noise_ref(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    """The torch reference of sample_and_noise."""
    t = sample_timesteps_ref(prob, alias, x0.shape[0], seed, step, offset)
    return t, add_noise_ref(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset)


def implementation(backend: str):
    """(sample_and_noise, add_noise) of a resolved backend name."""
    if backend == "torch":
        return sample_and_noise_ref, add_noise_ref
    mod = backends.module(backend)
    return mod.sample_and_noise, mod.add_noise


def _noise_grad(grad_xt, t, sqrt_ab, x0_dtype):
    """d loss / d x0 = grad_x_t sqrt(abar_t)."""
    return (grad_xt.float() * _per_sample(sqrt_ab[t], grad_xt)).to(x0_dtype)


class SampleAndNoiseFunction(torch.autograd.Function):
    """sample_and_noise with the gradient of x_t with respect to x0 (the tables are constants)."""

    @staticmethod
    def forward(ctx, x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset, fn):
        t, xt = fn(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset)
        ctx.save_for_backward(t, sqrt_ab)
        ctx.x0_dtype = x0.dtype
        ctx.mark_non_differentiable(t)
        return t, xt

    @staticmethod
    def backward(ctx, grad_t, grad_xt):
        t, sqrt_ab = ctx.saved_tensors
        return (_noise_grad(grad_xt, t, sqrt_ab, ctx.x0_dtype),) + (None,) * 8


class AddNoiseFunction(torch.autograd.Function):
    """add_noise with the gradient of x_t with respect to x0 (t and the tables are constants)."""

    @staticmethod
    def forward(ctx, x0, t, sqrt_ab, sqrt_1mab, seed, step, offset, fn):
        ctx.save_for_backward(t, sqrt_ab)
        ctx.x0_dtype = x0.dtype
        return fn(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset)

    @staticmethod
    def backward(ctx, grad_xt):
        t, sqrt_ab = ctx.saved_tensors
        return (_noise_grad(grad_xt, t, sqrt_ab, ctx.x0_dtype),) + (None,) * 7


def sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed=0, step=0, offset=0, backend="auto"):
    """(t int64 [B], x_t like x0) in one pass: t from the alias table, then x0 noised at t."""
    check_batch("x0", x0)
    check_alias_table(prob, alias)
    check_on("prob/alias", prob, x0.device)
    check_table("sqrt_ab", sqrt_ab, prob.numel(), x0.device)
    check_table("sqrt_1mab", sqrt_1mab, prob.numel(), x0.device)
    seed, step, offset = check_seed_step(seed, step, offset)
    fn, _ = implementation(backends.resolve_backend(backend, x0.device))
    return SampleAndNoiseFunction.apply(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset, fn)


def add_noise(x0, t, sqrt_ab, sqrt_1mab, seed=0, step=0, offset=0, backend="auto") -> torch.Tensor:
    """x_t = sqrt_ab[t] x0 + sqrt_1mab[t] eps(seed, step), in x0's dtype (float32 arithmetic)."""
    check_batch("x0", x0)
    check_table("sqrt_ab", sqrt_ab, None, x0.device)
    check_table("sqrt_1mab", sqrt_1mab, sqrt_ab.numel(), x0.device)
    check_t(t, x0.shape[0], sqrt_ab.numel(), x0.device)
    seed, step, offset = check_seed_step(seed, step, offset)
    _, fn = implementation(backends.resolve_backend(backend, x0.device))
    return AddNoiseFunction.apply(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset, fn)
