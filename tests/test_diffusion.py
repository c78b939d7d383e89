"""GaussianDiffusion.training_losses: the fused SpeeD objective equals the eager DiT/IDDPM
hybrid loss (weighted eps MSE + unweighted VB with eps detached) on the same t and noise."""

import pytest
import torch

from speed_fast.diffusion import GaussianDiffusion, mean_flat
from speed_fast.models import DiT, DiTConfig
from speed_fast.ops import FusedSpeeD
from speed_fast.ops import noise_ref
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import make_strategy

SEED, STEP, OFFSET = 7, 3, 5


@pytest.fixture(scope="module")
def setup():
    s = NoiseSchedule.make("linear", T=1000)
    fused = FusedSpeeD(s, make_strategy("speed", s, k=5.0, tau=700, lam=0.6), backend="torch", seed=SEED)
    return s, fused


def eager_reference(diffusion, fused, out, x0):
    """The reference-implementation style loss on the fused op's t and eps."""
    B, C = x0.shape[:2]
    t = fused.sample_timesteps(B, STEP, OFFSET)
    eps = noise_ref(x0.shape, SEED, STEP, OFFSET, x0.device)
    mse = mean_flat((out[:, :C] - eps) ** 2)
    w = fused.strategy.weights[t].float()
    x_t = diffusion.q_sample(x0, t, eps)
    vb = diffusion.vb_terms_bpd(torch.cat([out[:, :C].detach(), out[:, C:]], dim=1), x0, x_t, t)
    return (w * mse).mean() + vb.mean(), mse, vb, t, x_t


def test_losses_match_eager_reference_and_vb_only_trains_sigma(setup):
    s, fused = setup
    diffusion = GaussianDiffusion(s)
    torch.manual_seed(0)
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1  # (B, C, H, W)
    out = (0.5 * torch.randn(6, 4, 4, 4)).requires_grad_()  # a "model" output: eps and v
    seen = {}

    def model(x_t, t, y, drop=None):
        seen["x_t"], seen["t"] = x_t, t
        return out

    terms = diffusion.training_losses(model, x0, torch.zeros(6, dtype=torch.long), fused, step=STEP, offset=OFFSET)
    terms["loss"].backward()
    grad = out.grad.clone()
    out.grad = None
    ref_loss, ref_mse, ref_vb, ref_t, ref_xt = eager_reference(diffusion, fused, out, x0)
    ref_loss.backward()
    assert torch.equal(terms["t"], ref_t)
    torch.testing.assert_close(seen["x_t"], ref_xt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["mse"], ref_mse.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["vb"], ref_vb.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, out.grad, rtol=1e-5, atol=1e-8)
    # The eps half gets exactly the weighted-MSE gradient: the VB term does not reach it.
    B, D = 6, 2 * 4 * 4
    eps = noise_ref(x0.shape, SEED, STEP, OFFSET, x0.device)
    w = fused.strategy.weights[ref_t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(grad[:, :2], 2.0 / (B * D) * w * (out[:, :2].detach() - eps), rtol=1e-5, atol=1e-8)
    assert grad[:, 2:].abs().sum() > 0  # the variance half learns from VB
    assert not terms["mse"].requires_grad and not terms["vb"].requires_grad


def test_without_learned_sigma_the_loss_is_the_weighted_mse(setup):
    s, fused = setup
    diffusion = GaussianDiffusion(s, learn_sigma=False)
    torch.manual_seed(1)
    model = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2,
                          num_classes=3, learn_sigma=False))
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    drop = torch.zeros(6, dtype=torch.bool)
    terms = diffusion.training_losses(model, x0, y, fused, step=STEP, offset=OFFSET, drop=drop)
    assert torch.count_nonzero(terms["vb"]) == 0
    w = fused.strategy.weights[terms["t"]].float()
    torch.testing.assert_close(terms["loss"], (w * terms["mse"]).mean(), rtol=1e-6, atol=0)
    # A fresh DiT outputs zeros, so the per-sample MSE is the noise's mean square.
    eps = noise_ref(x0.shape, SEED, STEP, OFFSET, x0.device)
    torch.testing.assert_close(terms["mse"], mean_flat(eps**2), rtol=1e-6, atol=0)


def test_wrong_output_channels_are_rejected(setup):
    s, fused = setup
    diffusion = GaussianDiffusion(s)
    x0 = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="4 output channels, got 2"):
        diffusion.training_losses(lambda x, t, y: torch.zeros(2, 2, 4, 4), x0, torch.zeros(2, dtype=torch.long),
                                  fused, step=0)
