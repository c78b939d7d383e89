"""weighted_mse: the SpeeD loss against the regenerated noise, with its gradient, in one pass.

    loss, mse = weighted_mse(pred, t, weights, seed, step, offset=0)

loss = mean_b w(t_b) mean_i (pred_bi - eps_bi)^2 (a differentiable float32 scalar) and
mse = mean_i (pred_bi - eps_bi)^2 per sample (float32 [B], detached), eps being the noise of
`sample_and_noise` at the same (seed, step, offset). As fused-loss kernels do, the gradient
(pred - eps) 2 w(t_b) / (B D) is computed in the forward pass and kept for backward
(`WeightedMSEFunction`). pred may be a batch-strided view such as the eps half of a
learned-sigma output, model_out[:, :C].
"""

from __future__ import annotations

import math

import torch

from . import backends
from .sample_and_noise import noise_ref
from .validate import check_batch, check_finite_table, check_seed_step, check_t, check_table


def weighted_mse_ref(pred, t, weights, seed, step, offset=0):
    """The torch reference, written as the formula (differentiable by autograd): (loss, mse)."""
    B = pred.shape[0]
    eps = noise_ref(pred.shape, seed, step, offset, pred.device)
    mse = (pred.float() - eps).square().reshape(B, -1).mean(1)  # (B,); NaN for empty samples
    return (weights[t].float() * mse).mean(), mse.detach()


def weighted_mse_fwd_ref(pred, t, weights, seed, step, offset=0):
    """The torch backend's forward: (loss fp32 [], grad like pred (contiguous), mse fp32 [B]) with the
    gradient in closed form, as the kernels compute it."""
    B = pred.shape[0]
    D = math.prod(pred.shape[1:])
    eps = noise_ref(pred.shape, seed, step, offset, pred.device).reshape(B, D)
    diff = pred.float().reshape(B, D) - eps  # (B, D)
    mse = diff.square().mean(1)  # (B,); NaN for D = 0, as a mean over nothing is
    w = weights[t].float()  # (B,)
    loss = (w * mse).mean()
    scale = 2.0 / (B * D) if B * D else 0.0
    grad = (diff * scale * w[:, None]).to(pred.dtype).view(pred.shape)
    return loss, grad, mse


def implementation(backend: str):
    """The forward (loss, grad, mse) of a resolved backend name."""
    return weighted_mse_fwd_ref if backend == "torch" else backends.module(backend).weighted_mse_fwd


class WeightedMSEFunction(torch.autograd.Function):
    """Fused weighted MSE: the gradient is computed in the forward pass and kept for backward."""

    @staticmethod
    def forward(ctx, pred, t, weights, seed, step, offset, fwd):
        loss, grad, mse = fwd(pred, t, weights, seed, step, offset)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(mse)
        return loss, mse

    @staticmethod
    def backward(ctx, grad_loss, grad_mse):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def weighted_mse(pred, t, weights, seed=0, step=0, offset=0, backend="auto"):
    """(loss, mse) for pred [B, ...] and time steps t (int64 [B]); see the module docstring."""
    check_batch("pred", pred)
    check_table("weights", weights, None, pred.device)
    check_finite_table("weights", weights)
    check_t(t, pred.shape[0], weights.numel(), pred.device)
    seed, step, offset = check_seed_step(seed, step, offset)
    fwd = implementation(backends.resolve_backend(backend, pred.device))
    return WeightedMSEFunction.apply(pred, t, weights, seed, step, offset, fwd)
