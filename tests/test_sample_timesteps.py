"""sample_timesteps: the alias-method draws are bit-identical on torch, cpp and triton, and bad
input raises ValueError."""

import pytest
import torch
from fused_cases import KERNEL_BACKENDS, require, tables

from speed_fast.alias import build_alias_table
from speed_fast.ops import sample_timesteps, sample_timesteps_ref

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("T, n, seed, step, offset", [
    (1000, 256, 0, 0, 0),
    (7, 1, 3, 5, 0),
    (1, 17, 1, 1, 9),
    (100_000, 333, 2**64 - 1, 2**32 - 1, 2**40 - 5),  # extreme seed and step, counter high word != 0
    (1000, 0, 0, 0, 0),
    (1000, 70, 5, 6, 2**32 - 40),  # draws whose counter index carries into the high word
])
def test_draws_match_reference_exactly(backend, device, T, n, seed, step, offset):
    require(backend)
    prob, alias, *_ = tables(T, device)
    t = sample_timesteps(prob, alias, n, seed=seed, step=step, offset=offset, backend=backend)
    ref = sample_timesteps_ref(prob.cpu(), alias.cpu(), n, seed, step, offset)
    assert t.dtype == torch.int64 and t.device.type == torch.device(device).type
    assert torch.equal(t.cpu(), ref)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_offset_splits_a_batch_like_data_parallel_ranks(backend, device):
    require(backend)
    prob, alias, *_ = tables(50, device)
    whole = sample_timesteps(prob, alias, 96, seed=4, step=8, offset=0, backend=backend)
    parts = [sample_timesteps(prob, alias, 32, seed=4, step=8, offset=32 * r, backend=backend) for r in range(3)]
    assert torch.equal(whole, torch.cat(parts))


def test_cpp_every_instruction_set_draws_the_same():
    require("cpp")
    from speed_fast.ops import _cpp

    prob, alias, *_ = tables(1000, "cpu")
    ref = sample_timesteps_ref(prob, alias, 1000, 3, 4, 2**32 - 7)
    for isa in _cpp.supported_isas():
        with _cpp.use_isa(isa):
            assert torch.equal(_cpp.sample_timesteps(prob, alias, 1000, 3, 4, 2**32 - 7), ref), isa


def test_cpp_large_batch_uses_threads_and_matches():
    require("cpp")
    prob, alias, *_ = tables(10_000, "cpu")
    t = sample_timesteps(prob, alias, 300_000, seed=1, step=2, backend="cpp")  # above the parallel threshold
    assert torch.equal(t, sample_timesteps_ref(prob, alias, 300_000, 1, 2, 0))


def test_distribution_follows_the_table():
    require("cpp")
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    prob, alias = build_alias_table(p)
    t = sample_timesteps(prob, alias, 200_000, seed=11, step=0, backend="cpp")
    freq = torch.bincount(t, minlength=4).double() / t.numel()
    assert torch.allclose(freq, p, atol=4e-3)


@pytest.mark.parametrize("backend, device", [("torch", "cpu")] + KERNEL_BACKENDS)
def test_bad_input_raises_value_error(backend, device):
    if backend != "torch":
        require(backend)
    prob, alias, *_ = tables(10, device)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_timesteps(prob, alias, -1, backend=backend)
    with pytest.raises(ValueError, match="same length"):
        sample_timesteps(prob, alias[:5], 4, backend=backend)
    with pytest.raises(ValueError, match="prob must be float32"):
        sample_timesteps(prob.double(), alias, 4, backend=backend)
    with pytest.raises(ValueError, match="alias must be int32"):
        sample_timesteps(prob, alias.long(), 4, backend=backend)
    with pytest.raises(ValueError, match="step must be in"):
        sample_timesteps(prob, alias, 4, step=2**32, backend=backend)
    with pytest.raises(ValueError, match="seed must be in"):
        sample_timesteps(prob, alias, 4, seed=-1, backend=backend)
    with pytest.raises(ValueError, match="one device"):
        sample_timesteps(prob, alias.to("meta"), 4, backend=backend)


def test_cpp_rejects_a_corrupt_alias_table():
    require("cpp")
    prob = torch.zeros(8)  # every draw takes its column's alias
    alias = torch.arange(8, dtype=torch.int32)
    alias[3] = 99
    with pytest.raises(ValueError, match=r"alias\[3\] = 99"):
        sample_timesteps(prob, alias, 64, backend="cpp")
    with pytest.raises(ValueError, match="n must be >= 0"):  # the C++ op checks on its own too
        torch.ops.speed_fast.cpp_sample_timesteps(prob, alias, -3, 0, 0, 0)
