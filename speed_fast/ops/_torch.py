"""The torch reference of the fused ops: the semantics every backend is tested against.

Written for clarity, not speed: the noise is Philox computed in int64 tensors
(`speed_fast.rng`). Every backend module exposes the same four functions with
the same arguments, already validated by `speed_fast.ops`:

    sample_timesteps(prob, alias, n, seed, step, offset) -> int64 [n]
    add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset) -> x_t (x0's dtype)
    sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset) -> (t, x_t)
    weighted_mse_fwd(pred, t, weights, seed, step, offset) -> (loss fp32 [], grad (pred's dtype), mse fp32 [B])

x0 / pred are contiguous [B, ...]; tables are float32 [T] (alias int32 [T]) on the
data's device; offset is the global index of the batch's first sample.
"""

from __future__ import annotations

import math

import torch

from .. import rng


def available() -> tuple[bool, str]:
    return True, "pure torch reference, runs anywhere"


def sample_timesteps_ref(prob, alias, n, seed, step, offset=0):
    column, coin = rng.alias_draws_ref(n, prob.numel(), seed, step, offset)
    column = column.to(prob.device)
    coin = coin.to(prob.device)
    keep = coin < prob[column]
    return torch.where(keep, column, alias[column].long())


def noise_ref(shape, seed, step, offset, device):
    """eps for a contiguous batch of `shape` whose first sample is global sample `offset`."""
    per_sample = 1
    for d in shape[1:]:
        per_sample *= d
    numel = shape[0] * per_sample
    return rng.normal_ref(numel, seed, step, first_element=offset * per_sample, device=device).view(shape)


def _bcast(v, x):
    return v.view(-1, *([1] * (x.ndim - 1)))


def add_noise_ref(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    eps = noise_ref(x0.shape, seed, step, offset, x0.device)
    a = _bcast(sqrt_ab[t], x0)
    b = _bcast(sqrt_1mab[t], x0)
    return (a * x0.float() + b * eps).to(x0.dtype)


def weighted_mse_fwd_ref(pred, t, weights, seed, step, offset=0):
    B = pred.shape[0]
    D = pred[0].numel() if B else math.prod(pred.shape[1:])
    eps = noise_ref(pred.shape, seed, step, offset, pred.device).reshape(B, D)
    diff = pred.float().reshape(B, D) - eps  # (B, D)
    mse = diff.square().mean(1)  # (B,); NaN for D = 0, as a mean over nothing is
    w = weights[t].float()  # (B,)
    loss = (w * mse).mean()
    scale = 2.0 / (B * D) if B * D else 0.0
    grad = (diff * scale * w[:, None]).to(pred.dtype).view(pred.shape)
    return loss, grad, mse


# Backend interface (see the module docstring).
sample_timesteps = sample_timesteps_ref
add_noise = add_noise_ref
weighted_mse_fwd = weighted_mse_fwd_ref


def sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    t = sample_timesteps_ref(prob, alias, x0.shape[0], seed, step, offset)
    return t, add_noise_ref(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset)
