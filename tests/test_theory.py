"""Theorem 1 and the area split, against closed forms and independent numpy computations."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from speed_fast import theory
from speed_fast.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def lin():
    return NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)


def test_increment_moments_are_those_of_two_marginals(lin):
    ab = lin.alphas_cumprod.numpy()
    a = lin.alphas.numpy()
    # delta_t = x_{t+1} - x_t with independent marginal noises: mean (sqrt(abar_{t+1}) - sqrt(abar_t)) x0,
    # variance (1 - abar_{t+1}) + (1 - abar_t).
    np.testing.assert_allclose(theory.increment_mean_coef(lin), np.sqrt(ab[1:]) - np.sqrt(ab[:-1]), rtol=1e-9)
    np.testing.assert_allclose(theory.increment_variance(lin), (1 - ab[1:]) + (1 - ab[:-1]), rtol=1e-12)
    np.testing.assert_allclose(theory.increment_variance(lin), 2 - ab[:-1] * (1 + a[1:]), rtol=1e-12)


def test_theorem1_bounds_hold(lin):
    b = theory.increment_bounds(lin)
    psi = theory.increment_variance(lin)
    phi = theory.increment_mean_coef(lin)
    assert np.all(psi >= b["var_lower"][:-1])
    assert np.all(phi**2 <= b["mean_upper"][:-1])
    # The bound's rate is its derivative.
    t = b["t"]
    fd = np.gradient(b["var_lower"], t)
    np.testing.assert_allclose(fd[1:-1], b["var_lower_rate"][1:-1], rtol=1e-3, atol=1e-8)


def test_acceleration_peak(lin):
    assert theory.acceleration_peak(lin) == 218
    # Closed form of the bound's peak (beta_{t_acc} = sqrt(Delta_beta / T)) lands one step later.
    assert theory.acceleration_peak_bound(lin) == pytest.approx(219.14, abs=0.01)
    direct = int(np.argmax(np.gradient(2 - lin.alphas_cumprod.numpy()[:-1] * (1 + lin.alphas.numpy()[1:]))))
    assert theory.acceleration_peak(lin) == direct


@pytest.mark.parametrize("r, expected", [(10, 476.06), (100, 675.31), (140, 699.72), (1000, 828.20)])
def test_tau_from_magnitude_closed_form(r, expected):
    tau = theory.tau_from_magnitude(1000, 1e-4, 0.02, r)
    assert tau == pytest.approx(expected, abs=0.01)
    # Independent root of r_t = r.
    root = brentq(lambda t: theory.magnitude_lower_bound(1000, 1e-4, 0.02, t) - r, 0, 1000)
    assert tau == pytest.approx(root, abs=1e-9)


def test_tau_for_schedule(lin):
    assert theory.tau_for_schedule(lin) == 700
    assert theory.tau_for_schedule(lin, 10) == 477
    cos = NoiseSchedule.make("cosine")
    tau = theory.tau_for_schedule(cos, 140)
    ab = cos.alphas_cumprod.numpy()
    assert 1 / ab[tau] >= 140 > 1 / ab[tau - 1]
    with pytest.raises(ValueError, match="magnitude r"):
        theory.tau_for_schedule(lin, 1e30)


@pytest.mark.parametrize("args, needle", [
    ((1000, 1e-4, 0.02, 1.0), "magnitude r"),
    ((1000, 1e-4, 0.02, float("nan")), "magnitude r"),
    ((1000, 0.02, 1e-4, 10), "increasing"),
    ((1, 1e-4, 0.02, 10), "T"),
    ((1000, 0.0, 0.02, 10), "beta_start"),
])
def test_tau_from_magnitude_rejects(args, needle):
    with pytest.raises(ValueError, match=needle):
        theory.tau_from_magnitude(*args)


def test_areas(lin):
    idx = theory.area_index(lin, 700).numpy()
    assert (idx[:218] == 0).all() and (idx[218:700] == 1).all() and (idx[700:] == 2).all()
    with pytest.raises(ValueError, match="tau"):
        theory.area_index(lin, 0)


def test_sigma_schedules_table1():
    t = np.linspace(0.05, 1.0, 200)
    for kind in theory.SDE_KINDS:
        sde = theory.SigmaSchedule(kind)
        h = 1e-6
        np.testing.assert_allclose(sde.ds(t), (sde.s(t + h) - sde.s(t - h)) / (2 * h), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(sde.dsigma2(t), (sde.sigma2(t + h) - sde.sigma2(t - h)) / (2 * h), rtol=1e-5)
    vp = theory.SigmaSchedule("vp")
    # VP: s^2 sigma^2 = 1 - s^2, so Sigma is the sum of the two marginal variances.
    a, var = vp.increment(t, 1e-3)
    np.testing.assert_allclose(var, (1 - vp.s(t + 1e-3) ** 2) + (1 - vp.s(t) ** 2), rtol=1e-10)
    np.testing.assert_allclose(a, vp.s(t + 1e-3) - vp.s(t), rtol=1e-12)
    ve, edm = theory.SigmaSchedule("ve"), theory.SigmaSchedule("edm")
    np.testing.assert_allclose(ve.increment(t, 0.01)[1], 2 * t + 0.01)
    np.testing.assert_allclose(edm.increment(t, 0.01)[1], (t + 0.01) ** 2 + t**2)
    assert np.all(ve.increment(t, 0.01)[0] == 0)
    with pytest.raises(ValueError, match="SDE kind"):
        theory.SigmaSchedule("rectified")
    with pytest.raises(ValueError, match="dt"):
        vp.increment(t, 0.0)


def test_vp_discretisation_matches_ddpm():
    # DDPM with betas_i = (beta_0 + i/T (beta_1 - beta_0)) / T approximates the VP SDE at t = i / T.
    T = 1000
    ddpm = NoiseSchedule.make("linear", T=T, beta_start=0.1 / T, beta_end=20 / T)
    vp = theory.SigmaSchedule("vp", beta_0=0.1, beta_1=20.0)
    t = (np.arange(T) + 1) / T
    np.testing.assert_allclose(np.sqrt(ddpm.alphas_cumprod.numpy()), vp.s(t), rtol=0.05, atol=1e-3)
    assert math.isclose(float(vp.sigma2(np.array(0.0))), 0.0)
