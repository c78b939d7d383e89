"""EMA warm-up: the decay schedule min(d, (1 + n) / (10 + n)) and its update count."""

import pytest
import torch

from speed_fast.training.ema import ShardedEMA


def test_warmup_follows_the_weights_early_and_reaches_the_decay():
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
    plain, warm = ShardedEMA(lin, 0.99), ShardedEMA(lin, 0.99, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1) and plain.current_decay() == pytest.approx(0.99)
    expect = torch.zeros(2, 3, dtype=torch.float64)
    for n in range(1000):  # (1 + n) / (10 + n) passes 0.99 at n = 891
        with torch.no_grad():
            lin.weight.fill_(1.0)  # the weights jump from 0 to 1 and stay there
        d = min(0.99, (1 + n) / (10 + n))
        assert warm.current_decay() == pytest.approx(d)
        expect = d * expect + (1 - d) * 1.0
        warm.update()
        plain.update()
    assert warm.num_updates == 1000 and warm.current_decay() == pytest.approx(0.99)
    w = warm.full_state_dict()["weight"]
    torch.testing.assert_close(w.double(), expect, rtol=1e-5, atol=1e-6)
    # After 60 updates, the plain EMA still holds 0.99^60 = 55% of the initial zeros; with warm-up ~0.
    lin2 = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin2.weight.zero_()
    p2, w2 = ShardedEMA(lin2, 0.99), ShardedEMA(lin2, 0.99, warmup=True)
    with torch.no_grad():
        lin2.weight.fill_(1.0)
    for _ in range(60):
        p2.update()
        w2.update()
    assert float(p2.full_state_dict()["weight"][0, 0]) == pytest.approx(1 - 0.99**60, rel=1e-4)
    assert float(w2.full_state_dict()["weight"][0, 0]) > 0.9


def test_warmup_must_be_a_bool():
    with pytest.raises(ValueError, match="warmup"):
        ShardedEMA(torch.nn.Linear(2, 2), 0.9, warmup="yes")


def test_a_skipped_update_changes_nothing_and_does_not_count():
    lin = torch.nn.Linear(2, 2)
    ema = ShardedEMA(lin, 0.9, warmup=True)
    before = ema.full_state_dict()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(skip=torch.tensor(True))
    assert ema.num_updates == 0
    for name, t in ema.full_state_dict().items():
        assert torch.equal(t, before[name])
    ema.update(skip=torch.tensor(False))
    assert ema.num_updates == 1 and ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 890  # as a resume restores it
    assert ema.current_decay() == pytest.approx(0.9)
