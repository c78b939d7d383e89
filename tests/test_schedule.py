"""NoiseSchedule: tables against independent numpy computations, and input validation."""

import math

import numpy as np
import pytest
import torch

from speed_fast.schedule import NoiseSchedule


def test_linear_matches_numpy():
    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (1000,)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=0, atol=1e-18)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-13)
    np.testing.assert_allclose(s.snr.numpy(), abar / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy() ** 2 + s.sqrt_alphas_cumprod.numpy() ** 2, 1.0,
                               rtol=1e-14)


def test_quadratic_and_cosine_match_their_definitions():
    q = NoiseSchedule.make("quadratic", T=50, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(q.betas.numpy(), np.linspace(0.01, math.sqrt(0.02), 50) ** 2, rtol=1e-13)
    c = NoiseSchedule.make("cosine", T=100)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = np.array([f((i + 1) / 100) / f(0) for i in range(100)])
    # abar from the clipped betas equals the cosine curve wherever no beta was clipped to 0.999
    np.testing.assert_allclose(c.alphas_cumprod.numpy()[:-1], abar[:-1], rtol=1e-10)
    assert c.betas.max() <= 0.999


def test_posterior_terms_match_ddpm():
    s = NoiseSchedule.make("linear", T=200)
    b, ab = s.betas.numpy(), s.alphas_cumprod.numpy()
    ab_prev = np.append(1.0, ab[:-1])
    var = b * (1 - ab_prev) / (1 - ab)
    np.testing.assert_allclose(s.posterior_variance.numpy(), var, rtol=1e-12)
    np.testing.assert_allclose(s.posterior_log_variance_clipped.numpy(), np.log(np.append(var[1], var[1:])), rtol=1e-12)
    # The posterior mean coefficients reproduce x0 when x_t is noise-free: coef1 x0 + coef2 sqrt(abar_t) x0
    # = sqrt(abar_{t-1}) x0.
    lhs = s.posterior_mean_coef1.numpy() + s.posterior_mean_coef2.numpy() * np.sqrt(ab)
    np.testing.assert_allclose(lhs, np.sqrt(ab_prev), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(kind="sigmoid"), "kind"),
        (dict(kind="linear", T=1), "T"),
        (dict(kind="linear", T=10.0), "T"),
        (dict(kind="linear", T=True), "T"),
        (dict(kind="linear", beta_start=0.0), "beta_start"),
        (dict(kind="linear", beta_start=-1e-4), "beta_start"),
        (dict(kind="linear", beta_end=1.0), "beta_end"),
        (dict(kind="linear", beta_start=0.02, beta_end=1e-4), "beta_end"),
        (dict(kind="linear", beta_start=float("nan")), "beta_start"),
        (dict(kind="quadratic", beta_end=float("inf")), "beta_end"),
        (dict(kind="cosine", beta_start=1e-4), "cosine"),
        (dict(kind="cosine", max_beta=1.5), "max_beta"),
    ],
)
def test_invalid_parameters_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        NoiseSchedule.make(**kwargs)
