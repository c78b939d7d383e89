"""Time-step strategies: P(t) and w(t) against independent computations, and validation."""

import math

import numpy as np
import pytest
import torch

from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import STRATEGIES, make_strategy


@pytest.fixture(scope="module")
def lin():
    return NoiseSchedule.make("linear")


@pytest.mark.parametrize("schedule_kind", ["linear", "quadratic", "cosine"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_probs_are_distributions_at_every_step(schedule_kind, name):
    s = NoiseSchedule.make(schedule_kind)
    st = make_strategy(name, s)
    for step in (0, 1, 1234, 50_000, 10**7):
        p = st.probs(step)
        assert p.dtype == torch.float64 and p.shape == (s.T,)
        assert bool((p >= 0).all())
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    w = st.weights
    assert w.dtype == torch.float64 and w.shape == (s.T,) and bool(torch.isfinite(w).all()) and bool((w >= 0).all())


def test_speed_matches_reference_rule(lin):
    st = make_strategy("speed", lin, k=5.0, tau=700, lam=0.6)
    p = st.probs().numpy()
    np.testing.assert_allclose(p[:700], 5 / (700 * 5 + 300))
    np.testing.assert_allclose(p[700:], 1 / (700 * 5 + 300))
    g = np.gradient(1 - np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    expect = 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min())
    np.testing.assert_allclose(st.weights.numpy()[:700], expect[:700], rtol=1e-12)
    assert (st.weights.numpy()[700:] == 1).all()
    w = st.weights.numpy()[:700]
    assert w.min() >= 0.4 - 1e-12 and w.max() <= 0.6 + 1e-12


def test_speed_weighting_rules(lin):
    # "paper" (Sec. 2.6): d/dt Psi rescaled into [1 - lam, lam] over all t; "official" keeps that below
    # tau and sets w = 1 from tau on; "none" is w = 1 (asymmetric sampling alone). P(t) is the same.
    g = np.gradient(1 - np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    rescaled = 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min())
    official = make_strategy("speed", lin, k=5.0, tau=700, lam=0.6)
    paper = make_strategy("speed", lin, k=5.0, tau=700, lam=0.6, weighting="paper")
    none = make_strategy("speed", lin, k=5.0, tau=700, lam=0.6, weighting="none")
    np.testing.assert_allclose(paper.weights.numpy(), rescaled, rtol=1e-12)
    assert paper.weights.min() == pytest.approx(0.4) and paper.weights.max() == pytest.approx(0.6)
    assert float(paper.weights[999]) < 0.41  # the convergence area is down-weighted, unlike the code's w = 1
    assert torch.equal(paper.weights[:700], official.weights[:700])
    assert bool((none.weights == 1).all())
    for st in (paper, none):
        assert torch.equal(st.probs(), official.probs())
        assert st.describe()["weighting"] == st.weighting
    again = make_strategy("speed", lin, **{k: v for k, v in paper.describe().items() if k != "name"})
    assert torch.equal(again.weights, paper.weights)


def test_speed_from_magnitude(lin):
    assert make_strategy("speed", lin, r=140).tau == 700
    assert make_strategy("speed", lin).tau == 700  # default magnitude


def test_speed_dual_reproduces_paired_draws(lin):
    st = make_strategy("speed", lin, dual=True)
    assert st.dual_m == 642
    assert st.draws_needed(7) == 4 and st.draws_needed(8) == 5
    draws = torch.tensor([0, 641, 642, 999, 5])
    t = st.postprocess(draws, 8)
    assert t.tolist() == [0, 641, 642, 999, 5, 642, 1, 0]
    assert int(t.max()) < lin.T


def test_p2_and_min_snr(lin):
    snr = lin.snr.numpy()
    p2 = make_strategy("p2", lin)
    np.testing.assert_allclose(p2.weights.numpy(), 1 / (1 + snr), rtol=1e-12)
    ms = make_strategy("min_snr", lin, gamma=5.0)
    np.testing.assert_allclose(ms.weights.numpy(), np.minimum(snr, 5) / snr, rtol=1e-12)
    # The reference code's bug made Min-SNR equal to 5x P2; ours is not.
    assert not np.allclose(ms.weights.numpy(), 5 * p2.weights.numpy())
    assert ms.weights.max() <= 1.0
    np.testing.assert_allclose(make_strategy("p2", lin, gamma=0.5, k=2.0).weights.numpy(), 1 / np.sqrt(2 + snr))


def test_lognormal_mass_follows_log_sigma(lin):
    st = make_strategy("lognormal", lin, p_mean=-1.2, p_std=1.2)
    ab = lin.alphas_cumprod.numpy()
    log_sigma = 0.5 * np.log((1 - ab) / ab)
    p = st.probs().numpy()
    # The mass of steps with ln sigma within one p_std of p_mean approximates the normal's 68%.
    inside = np.abs(log_sigma + 1.2) <= 1.2
    assert p[inside].sum() == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.02)
    mode = int(np.argmax(p / np.abs(np.gradient(log_sigma))))
    assert abs(log_sigma[mode] + 1.2) < 0.02


def test_clts_ramps_and_never_goes_negative(lin):
    st = make_strategy("clts", lin, mu=300.0, sigma=50.0, ramp_steps=100)
    np.testing.assert_allclose(st.probs(0).numpy(), 1 / 1000)
    t = np.arange(1000)
    gauss = np.exp(-0.5 * ((t - 300) / 50) ** 2)
    gauss /= gauss.sum()
    np.testing.assert_allclose(st.probs(50).numpy(), 0.5 / 1000 + 0.5 * gauss, rtol=1e-12)
    for step in (100, 101, 10_000, 10**9):  # past the ramp the reference code went negative
        np.testing.assert_allclose(st.probs(step).numpy(), gauss, rtol=1e-12)
        assert (st.probs(step) >= 0).all()
    assert st.probs_key(10) != st.probs_key(20) and st.probs_key(200) == st.probs_key(300)


def test_loss_moment_follows_the_root_mean_square_loss_per_bin(lin):
    """P(t) = (1 - floor) m_j / (sum m |bin j|) + floor / T with m_j the RMS loss of t's bin (numpy,
    bin by bin); uniform until ready or when the moments are all zero; w = 1 / (T P) with importance
    weights, 1 without."""
    st = make_strategy("loss_moment", lin, bins=7, history=3, floor=0.01, importance_weights=True)
    mean_sq = torch.tensor([4.0, 1.0, 0.25, 9.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    p = st.probs_from_moments(mean_sq, torch.tensor(True)).numpy()
    edges = [math.ceil(j * 1000 / 7) for j in range(8)]  # bin j: t with floor(7 t / 1000) = j
    rms = np.sqrt(mean_sq.numpy())
    for j in range(7):
        size = edges[j + 1] - edges[j]
        want = 0.99 * rms[j] / rms.sum() / size + 0.01 / 1000
        np.testing.assert_allclose(p[edges[j]:edges[j + 1]], want, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p[edges[4]:edges[5]].min() == pytest.approx(0.01 / 1000)  # the floor keeps a zero-loss bin alive
    w = st.weights_for(torch.from_numpy(p)).numpy()
    np.testing.assert_allclose(w, 1.0 / (1000 * p), rtol=1e-12)
    uniform = torch.full((1000,), 1e-3, dtype=torch.float64)
    assert torch.equal(st.probs_from_moments(mean_sq, torch.tensor(False)), uniform)
    assert torch.equal(st.probs_from_moments(torch.zeros(7, dtype=torch.float64), torch.tensor(True)), uniform)
    biased = make_strategy("loss_moment", lin, bins=7)
    assert torch.equal(biased.weights_for(torch.from_numpy(p)), torch.ones(1000, dtype=torch.float64))
    assert torch.allclose(st.probs(), uniform, rtol=1e-15, atol=0)  # where a run starts
    assert torch.equal(st.weights, torch.ones(1000, dtype=torch.float64))


@pytest.mark.parametrize("name, params, needle", [
    ("speed", dict(k=0.5), "k must be"),
    ("speed", dict(k=float("nan")), "k must be"),
    ("speed", dict(k=True), "k must be"),
    ("speed", dict(lam=5.0), "lam must be"),  # the reference constructor's default, which gave negative weights
    ("speed", dict(lam=0.4), "lam must be"),
    ("speed", dict(tau=0), "tau must be"),
    ("speed", dict(tau=1001), "tau must be"),
    ("speed", dict(tau=700.5), "tau must be"),
    ("speed", dict(tau=700, r=140), "tau or r"),
    ("speed", dict(r=1.0), "r must be"),
    ("speed", dict(dual="yes"), "dual"),
    ("speed", dict(weighting="linear"), "weighting must be one of"),
    ("p2", dict(gamma=-1.0), "gamma"),
    ("p2", dict(k=0.0), "k must be"),
    ("min_snr", dict(gamma=0.0), "gamma"),
    ("lognormal", dict(p_std=0.0), "p_std"),
    ("lognormal", dict(p_mean=float("inf")), "p_mean"),
    ("clts", dict(sigma=-1.0), "sigma"),
    ("clts", dict(ramp_steps=0), "ramp_steps"),
    ("clts", dict(mu=1000.0), "mu"),
    ("loss_moment", dict(bins=0), "bins must be"),
    ("loss_moment", dict(bins=1001), "bins must be"),
    ("loss_moment", dict(history=0), "history must be"),
    ("loss_moment", dict(floor=0.0), "floor must be"),
    ("loss_moment", dict(floor=1.5), "floor must be"),
    ("loss_moment", dict(update_every=0), "update_every must be"),
    ("loss_moment", dict(importance_weights=1), "importance_weights"),
    ("speed", dict(gamma=1.0), "unknown parameter"),
    ("edm", dict(), "strategy must be one of"),
])
def test_invalid_parameters_raise(lin, name, params, needle):
    with pytest.raises(ValueError, match=needle):
        make_strategy(name, lin, **params)


def test_probs_rejects_negative_step(lin):
    with pytest.raises(ValueError, match="step"):
        make_strategy("uniform", lin).probs(-1)


def test_describe_rebuilds(lin):
    st = make_strategy("speed", lin, k=3.0, tau=600, lam=0.8, dual=True)
    d = st.describe()
    again = make_strategy(d.pop("name"), lin, **d)
    assert torch.equal(again.probs(), st.probs()) and torch.equal(again.weights, st.weights)


def test_fused_follows_the_strategy_step_not_the_rng_step(lin):
    # Under gradient accumulation the RNG is keyed by the micro-step while CLTS's ramp follows the
    # optimizer step: P(t) must come from strategy_step.
    from speed_fast.ops import FusedSpeeD

    st = make_strategy("clts", lin, mu=100.0, sigma=5.0, ramp_steps=10)
    fused = FusedSpeeD(lin, st, backend="torch", seed=0)
    x0 = torch.zeros(512, 1, 1, 1)
    t_late, _ = fused.sample_and_noise(x0, step=7, strategy_step=1000)  # ramp done: all mass near mu
    assert int((t_late - 100).abs().max()) < 40
    t_early, _ = fused.sample_and_noise(x0, step=7, strategy_step=0)  # uniform
    assert int((t_early - 100).abs().max()) > 400
    t_default, _ = fused.sample_and_noise(x0, step=1000)
    assert int((t_default - 100).abs().max()) < 40


def test_fused_rejects_a_strategy_of_another_schedule(lin):
    from speed_fast.ops import FusedSpeeD

    other = NoiseSchedule.make("cosine")  # same T, other abar: SpeeD's weights would not fit
    with pytest.raises(ValueError, match="another schedule"):
        FusedSpeeD(lin, make_strategy("speed", other), backend="torch")
    # An equal schedule built separately is fine.
    FusedSpeeD(NoiseSchedule.make("linear"), make_strategy("speed", lin), backend="torch")
