"""adaptive_speed (speed_fast.timesteps.AdaptiveSpeeD, speed_fast.adaptive.AdaptiveSpeedStatistics): the
run starts exactly as SpeeD, the window means and the rule for k and tau against an independent
numpy model written from the docstring, the bounds and the damping, the direction the rule moves
in, and the parameters' validation. (Backends, state round trip: tests/test_adaptive.py; resume
through the trainer: tests/test_adaptive_resume.py; host synchronisation: tests/test_train_zero.py.)"""

import math

import numpy as np
import pytest
import torch

from speed_fast.alias import implied_probabilities
from speed_fast.ops import FusedSpeeD
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import ADAPTIVE_K_STEP, make_strategy

LIN = NoiseSchedule.make("linear")


def test_it_starts_as_speed_and_keeps_speeds_table_until_history_windows_are_in():
    st = make_strategy("adaptive_speed", LIN, bins=10, history=3, update_every=2, dual=True)
    speed = make_strategy("speed", LIN, k=5.0, tau=700, lam=0.6, dual=True)
    assert torch.equal(st.probs(), speed.probs()) and torch.equal(st.weights, speed.weights)
    assert (st.tau_min, st.tau_max) == (477, 829)  # Theorem 1's tau for r = 10 and r = 1000
    a, b = FusedSpeeD(LIN, st, seed=2), FusedSpeeD(LIN, speed, seed=2)
    assert torch.equal(a.prob, b.prob) and torch.equal(a.alias, b.alias) and torch.equal(a.weights, b.weights)
    x0 = torch.zeros(64, 1, 2, 2)
    for step in range(6):  # windows close after steps 2, 4, 6: the rule needs 3 of them
        ta, _ = a.sample_and_noise(x0, step=step)
        tb, _ = b.sample_and_noise(x0, step=step)
        if step < 2:
            assert torch.equal(ta, tb)  # before the first rebuild: SpeeD's own table
        a.observe(ta, torch.exp(-ta / 200.0) * (0.5 if step >= 4 else 1.0))  # the loss halves in window 3
        a.end_step(step + 1)
        assert bool(a.adaptive.ready()) == (step == 5)
        if step < 5:
            assert float(a.adaptive.k) == 5.0 and int(a.adaptive.tau) == 700
            assert torch.allclose(implied_probabilities(a.prob, a.alias), speed.probs(), atol=1e-9)
    assert float(a.adaptive.k) != 5.0  # the first update that had its 3 windows moved k


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_defaults_are_speeds_defaults(schedule):
    """With no parameters, adaptive_speed is make_strategy("speed")'s defaults (k, tau from Theorem 1's
    r = 140, lam, weighting): the same P(t), w(t) and fused tables."""
    s = NoiseSchedule.make(schedule)
    st, speed = make_strategy("adaptive_speed", s), make_strategy("speed", s)
    assert {k: st.params()[k] for k in speed.params()} == speed.params()
    assert torch.equal(st.probs(), speed.probs()) and torch.equal(st.weights, speed.weights)
    a, b = FusedSpeeD(s, st, seed=0), FusedSpeeD(s, speed, seed=0)
    assert torch.equal(a.prob, b.prob) and torch.equal(a.alias, b.alias) and torch.equal(a.weights, b.weights)
    assert (float(a.adaptive.k), int(a.adaptive.tau)) == (speed.k, speed.tau)


def _model_rule(st, k, tau, means):
    """(k, tau) after one update, from the docstring of AdaptiveSpeeD, in numpy. means: [history, bins]."""
    H, T = st.history, st.T
    edges = [int(np.argmax(np.arange(T) * st.bins // T == j)) for j in range(st.bins)] + [T]
    x = np.arange(H) - (H - 1) / 2
    fell = np.array([-(H - 1) * np.polyfit(x, np.log(means[:, j]), 1)[0] for j in range(st.bins)])
    conv = [j for j in range(st.bins) if edges[j] >= tau]
    rest = [j for j in range(st.bins) if edges[j + 1] <= tau]
    if conv and rest:
        gap = fell[conv].mean() - fell[rest].mean()
        lim = math.log(ADAPTIVE_K_STEP)
        k = min(max(k * math.exp(min(max(gap, -lim), lim)), st.k_min), st.k_max)
    level = means.mean(0)
    mass = level * np.bincount(np.arange(T) * st.bins // T)
    total = mass.sum()
    target = next((edges[j] for j in range(st.bins) if mass[j:].sum() <= total / st.magnitude), T)
    target = min(max(target, st.tau_min), st.tau_max)
    step = int(np.ceil(T / st.bins))
    tau = tau + min(max(target - tau, -step), step)
    return k, tau


def test_window_means_and_the_rule_follow_the_numpy_model():
    """Random per-bin loss levels that drift: after every update the device state equals the model's
    k and tau (to float64 rounding), the window means are the per-bin means of what was observed (a bin
    without a loss in a window repeats its last mean), and P, w are SpeeD's for the new (k, tau)."""
    st = make_strategy("adaptive_speed", LIN, bins=8, history=3, update_every=1, k_min=2.0, k_max=9.0, r=60.0)
    fused = FusedSpeeD(LIN, st, backend="torch", seed=4)
    stats = fused.adaptive
    g = np.random.default_rng(0)
    level = np.exp(-np.arange(8) * 0.9)  # per-bin loss, falling with t like a real run's
    windows, last = [], np.zeros(8)
    k, tau = 5.0, st.tau
    seen, total = [], 0
    for step in range(16):
        level = level * np.exp(-g.uniform(0.0, 0.4, 8))  # each bin falls at its own pace
        t = torch.from_numpy(g.integers(0, 1000, 40))
        if step == 5:
            t = t[t < 875]  # bin 7 gets nothing in this window
        loss = torch.from_numpy(level[t.numpy() * 8 // 1000] * g.uniform(0.5, 1.5, t.numel()))
        total += t.numel()
        fused.observe(t, loss.float())
        b = t.numpy() * 8 // 1000
        lf = loss.float().double().numpy()
        mean = np.array([lf[b == j].mean() if (b == j).any() else last[j] for j in range(8)])
        last = mean
        windows.append(mean)
        fused.end_step(step + 1)
        if len(windows) >= 3:
            k, tau = _model_rule(st, k, tau, np.array(windows[-3:]))
        np.testing.assert_allclose(stats.ordered_means().numpy()[-1], mean, rtol=1e-12)
        assert float(stats.k) == pytest.approx(k, rel=1e-12) and int(stats.tau) == tau, step
        seen.append((float(stats.k), int(stats.tau)))
        p = implied_probabilities(fused.prob, fused.alias)
        want = make_strategy("speed", LIN, k=float(stats.k), tau=int(stats.tau), lam=0.6)
        assert torch.allclose(p, want.probs(), atol=1e-7)
        assert torch.equal(fused.weights, want.weights.float())
    assert len({s[1] for s in seen}) > 1 and len({s[0] for s in seen}) > 1  # both really moved
    trace = stats.trace[:16].tolist()
    assert [tuple(r) for r in trace] == [(kk, float(tt)) for kk, tt in seen]  # the trace of (k, tau)
    assert int(stats.counts.sum()) == total  # every loss observed, once


@pytest.mark.parametrize("faster, k_end", [("convergence", 10.0), ("rest", 1.0)])
def test_k_follows_relative_progress_within_its_bounds_and_steps(faster, k_end):
    """A convergence area whose losses fall faster than the rest's drives k up to k_max; one that falls
    slower drives it down to k_min; never more than ADAPTIVE_K_STEP per update, never past a bound,
    and tau never more than one bin per update nor outside [tau_min, tau_max]."""
    st = make_strategy("adaptive_speed", LIN, bins=20, history=2, update_every=1)
    fused = FusedSpeeD(LIN, st, backend="torch", seed=0)
    t = torch.arange(1000)
    ks, taus = [5.0], [700]
    for step in range(20):
        fast = (t >= 700) if faster == "convergence" else (t < 700)
        loss = torch.exp(-t.double() / 200) * torch.where(fast, 0.7, 0.95) ** step
        fused.observe(t, loss.float())
        fused.end_step(step + 1)
        ks.append(float(fused.adaptive.k))
        taus.append(int(fused.adaptive.tau))
    assert ks[-1] == k_end
    for a, b in zip(ks, ks[1:]):
        assert b / a <= ADAPTIVE_K_STEP * (1 + 1e-12) and a / b <= ADAPTIVE_K_STEP * (1 + 1e-12)
    assert all(abs(b - a) <= 50 for a, b in zip(taus, taus[1:])) and all(477 <= x <= 829 for x in taus)


def test_tau_moves_to_the_edge_where_the_loss_tail_is_one_rth_of_the_total():
    """Flat losses put most mass in the tail: tau goes up to tau_max; losses that vanish past t = 500
    bring it down to the first edge whose tail holds at most 1/r of the loss, one bin per update."""
    st = make_strategy("adaptive_speed", LIN, bins=10, history=2, update_every=1, tau_min=300, tau_max=900)
    fused = FusedSpeeD(LIN, st, backend="torch", seed=0)
    t = torch.arange(1000)
    for step in range(4):
        fused.observe(t, torch.ones(1000))
        fused.end_step(step + 1)
    assert int(fused.adaptive.tau) == 900
    taus = []
    for step in range(4, 14):
        fused.observe(t, torch.where(t < 500, 1.0, 1e-6).float())
        fused.end_step(step + 1)
        taus.append(int(fused.adaptive.tau))
    assert taus[-1] == 500 and taus == sorted(taus, reverse=True)
    assert all(a - b <= 100 for a, b in zip([900] + taus, taus))


@pytest.mark.parametrize("params, message", [
    (dict(k=12.0), "k must lie in [k_min, k_max] = [1.0, 10.0], got 12.0"),
    (dict(k_min=0.5), "k_min must be a finite number in [1.0, inf)"),
    (dict(k_min=3.0, k_max=2.0), "k_max must be a finite number in [3.0, inf)"),
    (dict(tau=700, tau_max=650), "tau must lie in [tau_min, tau_max] = [477, 650], got 700"),
    (dict(tau_min=800, tau_max=700), "tau_max must be an integer in [800, 1000]"),
    (dict(history=1), "history must be an integer in [2, inf]"),
    (dict(bins=0), "bins must be"),
    (dict(update_every=0), "update_every must be"),
    (dict(r=1.0), "r must be a finite number in (1.0, inf)"),
])
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_strategy("adaptive_speed", LIN, **params)


def test_params_rebuild_the_strategy():
    st = make_strategy("adaptive_speed", LIN, r=100.0, tau=650, k=4.0, k_max=8.0, history=5, dual=True)
    again = make_strategy("adaptive_speed", LIN, **st.params())
    assert again.params() == st.params() and again.magnitude == 100.0 and again.tau == 650
    assert torch.equal(again.probs(), st.probs()) and torch.equal(again.weights, st.weights)


def _adversarial_losses(g, kind, t):
    """float32 losses for time steps t (int64 [n]), and a keep mask, from one of the adversarial kinds."""
    n = t.numel()
    keep = torch.ones(n, dtype=torch.bool)
    if kind == "span":  # 60 decades, each sample anywhere in them
        loss = 10.0 ** g.uniform(-30, 30, n)
    elif kind == "flip":  # every bin swings by 1e20 up or down each window
        loss = 10.0 ** (20.0 * g.integers(0, 2, n)) * g.uniform(0.5, 1.0, n)
    elif kind == "zero_tail":  # nothing left to learn above some t, or below it
        cut = int(g.integers(0, 1000))
        loss = np.where((t.numpy() >= cut) == bool(g.integers(0, 2)), 0.0, g.uniform(0.0, 1.0, n))
    elif kind == "nonfinite":  # NaN and inf, some left out by the mask as the trainer does, some not
        loss = g.uniform(0.0, 1.0, n)
        loss[g.random(n) < 0.1] = np.nan
        loss[g.random(n) < 0.1] = np.inf
        keep = torch.from_numpy(g.random(n) < 0.7) | torch.from_numpy(np.isfinite(loss))
    else:  # "float32_max": at the edge of float32 (sums overflow float32, not float64)
        loss = np.full(n, 3.0e38) * g.uniform(0.9, 1.0, n)
    return torch.from_numpy(np.asarray(loss)).float(), keep


ALL_KINDS = ("span", "flip", "zero_tail", "nonfinite", "float32_max")


@pytest.mark.parametrize("params", [
    dict(bins=20, history=2),
    dict(bins=10, history=2, k_min=4.0, k_max=6.0, kinds=("span", "flip")),  # never frozen: the clamps are hit
    dict(bins=7, history=3, k=2.5, k_min=2.0, k_max=3.0, tau=620, tau_min=600, tau_max=650),  # narrow, uneven bins
    dict(bins=1, history=2),  # no group on either side of tau: k never moves
    # One bin per t, a magnitude close to 1: most bins never see a loss, so the rule mostly stays frozen.
    dict(bins=1000, history=2, r=1.5),
], ids=["default", "swinging", "narrow", "one_bin", "per_t"])
def test_bounds_and_damping_hold_on_adversarial_losses(params):
    """Losses over 60 decades, swinging by 1e20 between windows, zero on one side of T, NaN and inf
    (kept or not), float32's largest values, empty bins and empty steps, in random order: after every
    update k and tau stay in their bounds, move no more than one damped step, stay finite, and the
    tables in force are SpeeD's for them."""
    params = dict(params)
    kinds = params.pop("kinds", ALL_KINDS)
    st = make_strategy("adaptive_speed", LIN, update_every=1, dual=True, **params)
    fused = FusedSpeeD(LIN, st, backend="torch", seed=1)
    stats = fused.adaptive
    g = np.random.default_rng(sum(map(ord, str(params))))
    x0 = torch.zeros(4, 1, 1, 1)
    k, tau, moved, seen = float(stats.k), int(stats.tau), 0, set()
    for step in range(60):
        fused.sample_and_noise(x0, step=step)
        lo, hi = sorted(g.integers(0, 1001, 2)) if kinds == ALL_KINDS else (0, 1000)  # some bins get nothing
        t = torch.from_numpy(g.integers(lo, max(hi, lo + 1), int(g.integers(0, 200)))).clamp(max=999)
        loss, keep = _adversarial_losses(g, kinds[int(g.integers(0, len(kinds)))], t)
        fused.observe(t, loss, keep)
        fused.end_step(step + 1)
        k_new, tau_new = float(stats.k), int(stats.tau)
        assert math.isfinite(k_new) and st.k_min <= k_new <= st.k_max, (step, k_new)
        assert st.tau_min <= tau_new <= st.tau_max, (step, tau_new)
        assert max(k_new / k, k / k_new) <= ADAPTIVE_K_STEP * (1 + 1e-12) and abs(tau_new - tau) <= st.tau_step
        moved += (k_new, tau_new) != (k, tau)
        k, tau = k_new, tau_new
        seen.add((k, tau))
        want = make_strategy("speed", LIN, k=k, tau=tau, lam=st.lam, dual=True)
        assert torch.allclose(implied_probabilities(fused.prob, fused.alias), want.probs(), rtol=0, atol=1e-7)
        assert torch.equal(fused.weights, want.weights.float())
    if params["bins"] < 1000:
        assert moved > 0  # the rule was live, not frozen by the bad values
    if params["bins"] == 1:
        assert k == st.k
    if kinds != ALL_KINDS:
        assert {st.k_min, st.k_max} <= {kk for kk, _ in seen} and st.tau_max in {tt for _, tt in seen}, seen
