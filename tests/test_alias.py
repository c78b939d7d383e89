"""Alias tables and the reference sampler: exactness, empirical distribution, determinism, validation."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speed_fast.alias import build_alias_table, build_alias_table_device, implied_probabilities
from speed_fast.ops import sample_timesteps
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import make_strategy

LIN = NoiseSchedule.make("linear")


def _cases():
    rng = np.random.default_rng(0)
    one_hot = np.zeros(1000)
    one_hot[417] = 1.0
    return {
        "uniform": np.ones(1000),
        "speed_k5": make_strategy("speed", LIN, k=5.0, tau=700).probs().numpy(),
        "speed_k25": make_strategy("speed", LIN, k=25.0, tau=700).probs().numpy(),
        # Two-level P(t) as adaptive_speed moves it: the sweep's boundaries fall on (rounded) ties, where
        # the device builder once counted a deficit twice (the 5 / 500 case lost 2/3 of an item's mass).
        "speed_k5_tau500": make_strategy("speed", LIN, k=5.0, tau=500).probs().numpy(),
        "speed_k3_tau750": make_strategy("speed", LIN, k=3.0, tau=750).probs().numpy(),
        "one_hot": one_hot,
        "dirichlet": rng.dirichlet(np.full(257, 0.3)),
        "lognormal": make_strategy("lognormal", LIN).probs().numpy(),
        "bins_of_50": np.repeat(rng.random(20), 50),  # a loss_moment P(t): constant within bins
        "with_zeros": np.concatenate([np.zeros(10), rng.random(90), np.zeros(5)]),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_table_is_exact(case):
    p = CASES[case] / CASES[case].sum()
    prob, alias = build_alias_table(p)
    assert prob.dtype == torch.float32 and alias.dtype == torch.int32 and prob.shape == alias.shape == p.shape
    assert bool(((prob >= 0) & (prob <= 1)).all())
    assert bool(((alias >= 0) & (alias < p.size)).all())
    implied = implied_probabilities(prob, alias).numpy()
    # Exact up to the float32 storage of the thresholds (2^-24 per column, divided by T).
    np.testing.assert_allclose(implied, p, rtol=0, atol=2.0**-23 / p.size * 4)
    assert implied.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_draws_follow_p(case):
    p = CASES[case] / CASES[case].sum()
    prob, alias = build_alias_table(p)
    n = 1_000_000
    t = sample_timesteps(prob, alias, n, seed=11, step=3, backend="torch")
    assert t.dtype == torch.int64 and t.shape == (n,)
    counts = np.bincount(t.numpy(), minlength=p.size)
    assert counts[p == 0].sum() == 0  # never a zero-probability step
    support = p > 0
    if support.sum() == 1:
        assert counts[support][0] == n
        return
    _, pvalue = chisquare(counts[support], n * p[support])
    assert pvalue > 1e-4, f"chi-square rejects the sampler for {case}: p={pvalue:.2e}"


def test_sampler_detects_a_wrong_distribution():
    # The chi-square check has power: draws from k=5 tested against uniform are rejected.
    prob, alias = build_alias_table(CASES["speed_k5"])
    counts = np.bincount(sample_timesteps(prob, alias, 200_000, seed=1, backend="torch").numpy(), minlength=1000)
    assert chisquare(counts, np.full(1000, 200.0))[1] < 1e-10


def test_determinism_and_offsets():
    prob, alias = build_alias_table(CASES["speed_k5"])
    a = sample_timesteps(prob, alias, 1000, seed=5, step=9, backend="torch")
    assert torch.equal(a, sample_timesteps(prob, alias, 1000, seed=5, step=9, backend="torch"))
    assert not torch.equal(a, sample_timesteps(prob, alias, 1000, seed=5, step=10, backend="torch"))
    assert not torch.equal(a, sample_timesteps(prob, alias, 1000, seed=6, step=9, backend="torch"))
    # Draw b depends only on (seed, step, offset + b): a rank's slice equals the global batch's slice.
    tail = sample_timesteps(prob, alias, 600, seed=5, step=9, offset=400, backend="torch")
    assert torch.equal(tail, a[400:])
    big_seed = sample_timesteps(prob, alias, 10, seed=2**64 - 1, step=2**32 - 1, backend="torch")
    assert big_seed.shape == (10,)
    assert sample_timesteps(prob, alias, 0, backend="torch").shape == (0,)


@pytest.mark.parametrize("p, needle", [
    ([], "non-empty"),
    ([[0.5, 0.5]], "1-D"),
    ([0.5, -0.1, 0.6], r"p\[1\]"),
    ([0.5, float("nan")], "finite"),
    ([0.0, 0.0], "positive sum"),
])
def test_build_rejects(p, needle):
    with pytest.raises(ValueError, match=needle):
        build_alias_table(np.array(p, dtype=np.float64))


def test_sample_rejects_bad_arguments():
    prob, alias = build_alias_table(np.ones(10))
    with pytest.raises(ValueError, match="same length"):
        sample_timesteps(prob, alias[:9], 4, backend="torch")
    with pytest.raises(ValueError, match="float32"):
        sample_timesteps(prob.double(), alias, 4, backend="torch")
    with pytest.raises(ValueError, match="int32"):
        sample_timesteps(prob, alias.long(), 4, backend="torch")
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_timesteps(prob, alias, -1, backend="torch")
    with pytest.raises(ValueError, match="n must be an integer"):
        sample_timesteps(prob, alias, 2.5, backend="torch")
    with pytest.raises(ValueError, match="seed"):
        sample_timesteps(prob, alias, 4, seed=-1, backend="torch")
    with pytest.raises(ValueError, match="step"):
        sample_timesteps(prob, alias, 4, step=2**32, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        sample_timesteps(prob, alias, 4, backend="cuda")


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_built_table_is_exact(case):
    """The sweep built with torch ops implies p up to the float32 storage of the thresholds: each
    column's threshold is within 2^-25 of its float64 value, and an item's mass gathers its own
    column and the columns aliasing to it (as for Vose's table)."""
    p = CASES[case] / CASES[case].sum()
    prob, alias = build_alias_table_device(torch.from_numpy(p))
    assert prob.dtype == torch.float32 and alias.dtype == torch.int32 and prob.shape == alias.shape == p.shape
    assert bool(((prob >= 0) & (prob <= 1)).all()) and bool(((alias >= 0) & (alias < p.size)).all())
    implied = implied_probabilities(prob, alias).numpy()
    in_degree = np.bincount(alias.numpy()[prob.numpy() < 1], minlength=p.size)
    assert np.all(np.abs(implied - p) <= (1 + in_degree) * 2.0**-25 / p.size + 1e-15)
    assert np.all(implied[p == 0] == 0)
    again = build_alias_table_device(torch.from_numpy(p))
    assert torch.equal(again[0], prob) and torch.equal(again[1], alias)  # deterministic


@pytest.mark.parametrize("case", ["dirichlet", "bins_of_50", "with_zeros"])
def test_device_built_table_draws_follow_p(case):
    p = CASES[case] / CASES[case].sum()
    prob, alias = build_alias_table_device(torch.from_numpy(p))
    n = 400_000
    counts = np.bincount(sample_timesteps(prob, alias, n, seed=4, step=1, backend="torch").numpy(), minlength=p.size)
    assert counts[p == 0].sum() == 0
    _, pvalue = chisquare(counts[p > 0], n * p[p > 0])
    assert pvalue > 1e-4, f"chi-square rejects the device-built table for {case}: p={pvalue:.2e}"
