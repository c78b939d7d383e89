"""The adaptive strategies on the fused path (speed_fast.adaptive, FusedSpeeD.observe / end_step): the
per-bin histories against a plain Python deque model, the table rebuilt every update_every steps
from them, the same draws on torch, cpp and triton fed the same losses, and a state round trip
that continues bit for bit (loss_moment and adaptive_speed; adaptive_speed's rule itself is in
tests/test_adaptive_speed.py)."""

from collections import deque

import numpy as np
import pytest
import torch
from fused_cases import KERNEL_BACKENDS, require

from speed_fast.adaptive import LossMomentStatistics
from speed_fast.alias import build_alias_table_device, implied_probabilities
from speed_fast.ops import FusedSpeeD, sample_timesteps_ref
from speed_fast.schedule import NoiseSchedule
from speed_fast.timesteps import make_strategy

LIN = NoiseSchedule.make("linear")


def test_histories_keep_the_last_losses_of_each_bin_in_order():
    """Batches with more losses of a bin than its history, masked samples and a mask of one value
    (a skipped step): the rings hold what deques of length `history` hold, and counts count every
    kept loss."""
    st = make_strategy("loss_moment", LIN, bins=5, history=3)
    stats = LossMomentStatistics(st, "cpu")
    model = [deque(maxlen=3) for _ in range(5)]
    counts = [0] * 5
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        n = int(torch.randint(1, 12, (1,), generator=g))
        hi = 400 if step % 7 == 0 else 1000  # some batches crowd the first bins (more than 3 losses each)
        t = torch.randint(0, hi, (n,), generator=g)
        loss = torch.rand(n, generator=g)
        keep = torch.rand(n, generator=g) > 0.2 if step % 3 else torch.tensor([step % 2 == 0])
        stats.observe(t, loss, keep)
        for b in range(n):
            if bool(keep.expand(n)[b]):
                j = int(t[b]) * 5 // 1000
                model[j].append(float(loss[b]))
                counts[j] += 1
    assert stats.counts.tolist() == counts
    ring = stats.ring[:-1].view(5, 3)
    for j in range(5):
        start = counts[j] % 3  # the oldest entry of a full ring
        ordered = [float(ring[j, (start + i) % 3]) for i in range(3)] if counts[j] >= 3 else \
            [float(v) for v in ring[j, :counts[j]]]
        assert ordered == list(model[j]), j
    assert bool(stats.ready()) == all(c >= 3 for c in counts)
    want = np.array([np.mean(np.square(model[j])) if counts[j] >= 3 else 0.0 for j in range(5)])
    if bool(stats.ready()):
        np.testing.assert_allclose(stats.mean_square().numpy(), want, rtol=1e-6)


def _feed(fused, steps, x0, losses_of):
    """Run `steps` optimizer steps of one micro-batch each: draw, observe losses_of(t), end the step."""
    draws = []
    for step in range(steps):
        t, _ = fused.sample_and_noise(x0, step=step)
        draws.append(t.cpu())
        fused.observe(t, losses_of(t))
        fused.end_step(step + 1)
    return torch.stack(draws)


def _losses(t):
    return 0.05 + (t.double() / 1000) ** 2  # large at high noise: P moves towards large t


_step_of_losses = [0]


def _falling_losses(t):
    """Losses that fall over the calls (faster at large t), so that adaptive_speed's k and tau move."""
    _step_of_losses[0] += 1
    n = _step_of_losses[0]
    return torch.exp(-t.double() / 150) * torch.where(t >= 700, 0.8, 0.97) ** n


# The strategies compared across backends and resumed, with losses that make each one adapt, and the
# steps of the backend comparison (adaptive_speed adapts from step 4 on: 3 rebuilds in 8 steps).
ADAPTIVE = {
    "loss_moment": (lambda: make_strategy("loss_moment", LIN, bins=10, history=3, update_every=2,
                                          importance_weights=True), _losses, 14),
    "adaptive_speed": (lambda: make_strategy("adaptive_speed", LIN, bins=10, history=2, update_every=2, dual=True),
                       _falling_losses, 8),
}


def test_table_is_rebuilt_every_update_every_steps_from_the_histories():
    st = make_strategy("loss_moment", LIN, bins=10, history=4, update_every=3, importance_weights=True)
    fused = FusedSpeeD(LIN, st, backend="torch", seed=7)
    x0 = torch.zeros(32, 1, 2, 2)
    for step in range(12):
        before = (fused.prob.clone(), fused.alias.clone(), fused.weights.clone())
        t, _ = fused.sample_and_noise(x0, step=step)
        fused.observe(t, _losses(t))
        fused.end_step(step + 1)
        changed = not (torch.equal(before[0], fused.prob) and torch.equal(before[1], fused.alias))
        if (step + 1) % 3:
            assert not changed and torch.equal(before[2], fused.weights), step  # only at multiples of 3
    assert bool(fused.adaptive.ready())
    p = fused.adaptive.probs()
    prob, alias = build_alias_table_device(p)
    assert torch.equal(fused.prob, prob) and torch.equal(fused.alias, alias)  # the last rebuild's (step 12)
    assert torch.equal(fused.weights, (1.0 / (1000 * p)).float())
    implied = implied_probabilities(fused.prob, fused.alias)
    assert float(implied[900:].sum()) > 5 * float(implied[:100].sum())  # mass follows the larger losses
    t = fused.sample_timesteps(64, step=50)
    assert torch.equal(t, sample_timesteps_ref(fused.prob, fused.alias, 64, 7, 50, 0))


def test_uniform_until_every_bin_is_full():
    st = make_strategy("loss_moment", LIN, bins=4, history=2, update_every=1)
    fused = FusedSpeeD(LIN, st, backend="torch", seed=1)
    start = (fused.prob.clone(), fused.alias.clone())
    fused.observe(torch.tensor([0, 10, 300, 600, 610, 999, 998]), torch.rand(7))  # bin 1 (250..499) has one loss
    fused.end_step(1)
    assert not bool(fused.adaptive.ready())
    assert torch.allclose(implied_probabilities(fused.prob, fused.alias), torch.full((1000,), 1e-3, dtype=torch.float64))
    assert torch.equal(fused.prob, start[0]) and torch.equal(fused.alias, start[1])
    fused.observe(torch.tensor([260]), torch.tensor([3.0]))
    fused.end_step(2)
    assert bool(fused.adaptive.ready()) and not torch.equal(fused.prob, start[0])


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_backends_draw_the_same_adaptive_run(backend, device, name):
    """Given the same losses, every backend holds the same tables and draws the same t at every step,
    across several rebuilds (the table is built once, by torch ops, and read by each backend's draw)."""
    require(backend)
    make, losses, steps = ADAPTIVE[name]
    st = make()
    ref = FusedSpeeD(LIN, st, backend="torch", seed=3)
    other = FusedSpeeD(LIN, st, device=device, backend=backend, seed=3)
    x0 = torch.randn(24, 1, 3, 3)
    _step_of_losses[0] = 0
    a = _feed(ref, steps, x0, losses)
    _step_of_losses[0] = 0
    b = _feed(other, steps, x0.to(device), lambda t: losses(t.cpu()).to(t.device))
    assert torch.equal(a, b)
    assert torch.equal(ref.prob, other.prob.cpu()) and torch.equal(ref.weights, other.weights.cpu())
    start = FusedSpeeD(LIN, make(), seed=3)  # the strategy's starting table, never adapted
    assert not torch.equal(implied_probabilities(ref.prob, ref.alias), implied_probabilities(start.prob, start.alias))
    assert not torch.equal(a[-1], start.sample_and_noise(x0, step=steps - 1)[0])  # the adapted table is in use


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_state_round_trip_continues_bit_for_bit(name):
    make, losses, _ = ADAPTIVE[name]
    st = make()
    x0 = torch.randn(16, 1, 2, 2)
    straight = FusedSpeeD(LIN, st, backend="torch", seed=9)
    _step_of_losses[0] = 0
    first = _feed(straight, 7, x0, losses)
    state = {k: v.clone() for k, v in straight.state_dict().items()}
    want = {"loss_moment": ["alias", "counts", "prob", "ring", "weights"],
            "adaptive_speed": ["alias", "counts", "k", "means", "prob", "tau", "trace", "weights", "window_n",
                               "window_sum", "windows"]}[name]
    assert sorted(state) == want
    mark = _step_of_losses[0]
    rest = [_feed_from(straight, s, x0, losses) for s in range(7, 15)]
    resumed = FusedSpeeD(LIN, st, backend="torch", seed=9)
    resumed.load_state_dict(state)
    _step_of_losses[0] = mark
    assert all(torch.equal(r, _feed_from(resumed, s, x0, losses)) for s, r in zip(range(7, 15), rest))
    assert torch.equal(resumed.prob, straight.prob) and torch.equal(resumed.weights, straight.weights)
    assert first.shape == (7, 16)
    before = {k: v.clone() for k, v in resumed.state_dict().items()}
    with pytest.raises(ValueError, match="counts"):
        resumed.load_state_dict({**state, "counts": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="lacks"):
        resumed.load_state_dict({"counts": state["counts"]})
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in before.items())  # a refused state loads nothing


def _feed_from(fused, step, x0, losses=_losses):
    t, _ = fused.sample_and_noise(x0, step=step)
    fused.observe(t, losses(t))
    fused.end_step(step + 1)
    return t
