"""weighted_mse: loss, per-sample mse and the gradient (computed in the forward pass) agree with
autograd of the torch reference on every backend and dtype; bad input raises ValueError."""

import pytest
import torch
from fused_cases import FLOAT_DTYPES, KERNEL_BACKENDS, assert_dtype_close, require, tables

from speed_fast.ops import FusedSpeeD, noise_ref, sample_and_noise, weighted_mse
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import make_strategy

pytestmark = pytest.mark.usefixtures("seeded")

SHAPES = [(9, 3, 17, 5), (1, 4, 8, 8), (5, 7), (2, 3, 40, 41)]


def _autograd_reference(pred, t, weights, seed, step, offset):
    """(loss, mse, grad) by autograd of the reference formula, on the CPU, in fp32 arithmetic
    on pred's values; grad comes back in pred's dtype."""
    pred = pred.detach().cpu().requires_grad_()
    B = pred.shape[0]
    eps = noise_ref(pred.shape, seed, step, offset, "cpu")
    mse = (pred.float() - eps).square().reshape(B, -1).mean(1)  # (B,)
    loss = (weights.cpu()[t.cpu()] * mse).mean()
    loss.backward()
    return loss.detach(), mse.detach(), pred.grad


def _assert_grad_close(grad, ref):
    """fp32 gradients: eps agrees to ~1e-7, so the error is relative to the gradient's scale."""
    err = float((grad.cpu() - ref).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()), err


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_loss_and_gradient_match_autograd_of_reference(backend, device, dtype, shape):
    require(backend)
    _, _, _, _, weights = tables(1000, device)
    pred32 = torch.randn(shape)
    pred = pred32.to(dtype).to(device).requires_grad_()
    t = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(1)).to(device)
    seed, step, offset = 77, 3, 11
    loss, mse = weighted_mse(pred, t, weights, seed=seed, step=step, offset=offset, backend=backend)
    loss.backward()
    # Reference on the same (dtype-rounded) values in fp32, and on the fp32 originals.
    loss_d, mse_d, grad_d = _autograd_reference(pred, t, weights, seed, step, offset)
    loss_32, mse_32, grad_32 = _autograd_reference(pred32, t, weights, seed, step, offset)
    assert loss.dtype == torch.float32 and loss.shape == () and mse.dtype == torch.float32
    assert pred.grad.dtype == dtype and pred.grad.shape == pred.shape
    assert not mse.requires_grad
    assert_dtype_close(loss, loss_32, loss_d, atol=1e-6)
    assert_dtype_close(mse, mse_32, mse_d, atol=1e-6)
    # The gradient is O(1 / numel): atol relative to its size (eps itself is only good to ~1e-7).
    assert_dtype_close(pred.grad, grad_32, grad_d.to(dtype), atol=1e-5 * float(grad_32.abs().max()))
    # Same input values: only float32 rounding separates the kernel from the reference.
    assert torch.allclose(loss.detach().cpu(), loss_d, rtol=1e-5, atol=0)
    assert torch.allclose(mse.cpu(), mse_d, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_backward_scales_by_the_incoming_gradient(backend, device):
    require(backend)
    _, _, _, _, weights = tables(100, device)
    pred = torch.randn(3, 4, 5, device=device, requires_grad=True)
    t = torch.tensor([1, 50, 99], device=device)
    loss, _ = weighted_mse(pred, t, weights, seed=1, step=1, backend=backend)
    (2.5 * loss).backward()
    _, _, grad = _autograd_reference(pred, t, weights, 1, 1, 0)
    _assert_grad_close(pred.grad, 2.5 * grad)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_learned_sigma_slice_gets_its_gradient(backend, device):
    """pred = model_out[:, :C] (batch-strided) works and the gradient reaches model_out."""
    require(backend)
    _, _, _, _, weights = tables(100, device)
    model_out = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
    t = torch.tensor([3, 1, 4, 1], device=device)
    loss, _ = weighted_mse(model_out[:, :3], t, weights, seed=2, step=7, backend=backend)
    loss.backward()
    _, _, grad = _autograd_reference(model_out[:, :3].contiguous(), t, weights, 2, 7, 0)
    _assert_grad_close(model_out.grad[:, :3], grad)
    assert torch.count_nonzero(model_out.grad[:, 3:]) == 0


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_loss_sees_the_noise_of_sample_and_noise(backend, device):
    """pred = eps exactly gives zero loss: both passes draw the same noise (and the cpp
    backend's kept noise equals the regenerated one)."""
    require(backend)
    prob, alias, _, _, weights = tables(10, device)
    zeros, ones = torch.zeros(10, device=device), torch.ones(10, device=device)
    x0 = torch.zeros(5, 3, 7, 3, device=device)
    t, eps = sample_and_noise(x0, prob, alias, zeros, ones, seed=9, step=4, offset=6, backend=backend)
    loss, mse = weighted_mse(eps, t, weights, seed=9, step=4, offset=6, backend=backend)
    assert float(loss) == 0.0 and float(mse.abs().max()) == 0.0
    loss2, _ = weighted_mse(eps, t, weights, seed=9, step=5, offset=6, backend=backend)
    assert float(loss2) > 0.5


def test_cpp_kept_noise_is_read_back_and_gives_identical_results():
    """sample_and_noise keeps float32 noise; the loss of the same step reads it (a cache hit) and
    gives exactly what drawing it again gives; without the cache nothing is kept."""
    require("cpp")
    from speed_fast.ops import _cpp

    prob, alias, sab, s1, weights = tables(100, "cpu")
    x0, pred = torch.randn(8, 4, 9, 9), torch.randn(8, 4, 9, 9)
    outs = []
    for keep in (True, False):
        with _cpp.keep_noise(keep):
            t, _ = _cpp.sample_and_noise(x0, prob, alias, sab, s1, 5, 6, 7)
            hits = _cpp.eps_cache_hits()
            outs.append(_cpp.weighted_mse_fwd(pred, t, weights, 5, 6, 7))  # kept noise when keep
            assert _cpp.eps_cache_hits() == hits + (1 if keep else 0)
            outs.append(_cpp.weighted_mse_fwd(pred, t, weights, 5, 6, 7))  # drawn again: taken once
            assert _cpp.eps_cache_hits() == hits + (1 if keep else 0)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_fused_speed_loss_matches_reference(backend, device):
    require(backend)
    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    st = make_strategy("speed", s, k=5.0, tau=700, lam=0.6)
    fused = FusedSpeeD(s, st, device=device, backend=backend, seed=3)
    ref = FusedSpeeD(s, st, device="cpu", backend="torch", seed=3)
    x0 = torch.randn(6, 4, 6, 6)
    t, xt = fused.sample_and_noise(x0.to(device), step=10, offset=0)
    pred = (0.5 * xt).detach().requires_grad_()
    loss, mse = fused.loss(pred, t, step=10)
    loss.backward()
    pred_ref = (0.5 * xt).detach().cpu().requires_grad_()
    loss_ref, mse_ref = ref.loss(pred_ref, t.cpu(), step=10)
    loss_ref.backward()
    assert torch.allclose(loss.detach().cpu(), loss_ref.detach(), rtol=1e-5)
    assert torch.allclose(mse.cpu(), mse_ref, rtol=1e-5)
    _assert_grad_close(pred.grad, pred_ref.grad)


@pytest.mark.parametrize("backend, device", [("torch", "cpu")] + KERNEL_BACKENDS)
def test_bad_input_raises_value_error(backend, device):
    if backend != "torch":
        require(backend)
    _, _, _, _, weights = tables(10, device)
    pred = torch.randn(3, 4, device=device)
    t = torch.tensor([0, 5, 9], device=device)
    bad_w = weights.clone()
    bad_w[5] = float("nan")
    with pytest.raises(ValueError, match=r"weights must be finite, got weights\[5\] = nan"):
        weighted_mse(pred, t, bad_w, backend=backend)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\), got values in \[0, 10\]"):
        weighted_mse(pred, torch.tensor([0, 10, 1], device=device), weights, backend=backend)
    with pytest.raises(ValueError, match=r"t must be an int64 tensor of shape \(3,\)"):
        weighted_mse(pred, t[:2], weights, backend=backend)
    with pytest.raises(ValueError, match="pred must be float32, bfloat16 or float16"):
        weighted_mse(pred.double(), t, weights, backend=backend)
    with pytest.raises(ValueError, match="weights must be a float32 1-D tensor"):
        weighted_mse(pred, t, weights.double(), backend=backend)
    with pytest.raises(ValueError, match="weights must be on"):
        weighted_mse(pred, t, weights.to("meta"), backend=backend)


def test_cpp_op_checks_its_own_arguments():
    require("cpp")
    _, _, _, _, weights = tables(10, "cpu")
    pred = torch.randn(3, 4)
    bad_w = weights.clone()
    bad_w[2] = float("inf")
    op = torch.ops.speed_fast.cpp_weighted_mse_fwd
    with pytest.raises(ValueError, match=r"weights must be finite, got weights\[2\] = inf"):
        op(pred, torch.tensor([0, 2, 1]), bad_w, 0, 0, 0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\), got t\[2\] = 12"):
        op(pred, torch.tensor([0, 2, 12]), weights, 0, 0, 0)
    with pytest.raises(ValueError, match="pred must be contiguous"):
        op(pred.t(), torch.tensor([0, 2, 1, 1]), weights, 0, 0, 0)


@pytest.mark.parametrize("backend, device", [pytest.param("torch", "cpu", id="torch"), *KERNEL_BACKENDS])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 4)], ids=str)
def test_empty_batches_give_nan_means_not_a_crash(backend, device, shape):
    require(backend)
    prob, alias, sab, s1, weights = tables(10, device)
    x0 = torch.randn(shape, device=device)
    t, xt = sample_and_noise(x0, prob, alias, sab, s1, seed=1, step=1, backend=backend)
    assert t.shape == (shape[0],) and xt.shape == x0.shape
    pred = x0.clone().requires_grad_()
    loss, mse = weighted_mse(pred, t, weights, seed=1, step=1, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and mse.shape == (shape[0],) and bool(torch.isnan(mse).all())
    assert pred.grad.shape == pred.shape
