"""The shared counter-based RNG: Philox known answers, uniform/normal conversion, noise layout."""

import math

import pytest
import torch

from speed_fast import rng


def _philox(c, k):
    out = rng.philox4x32(*[torch.tensor([x]) for x in c], k[0], k[1])
    return [int(v) for v in out]


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(counter, key, expected):
    assert _philox(counter, key) == expected


def test_uniform_matches_tritons_conversion():
    r = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 12345678], dtype=torch.int64)
    u = rng.uniform(r)
    # int32 reinterpretation, negatives x -> ~x, then times float32(4.6566127342e-10)
    as_i32 = [x - 2**32 if x >= 2**31 else x for x in r.tolist()]
    folded = [~x if x < 0 else x for x in as_i32]
    expect = torch.tensor(folded, dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    assert torch.equal(u, expect)
    assert float(u.max()) < 1.0 and float(u.min()) >= 0.0


def test_normals_are_standard_and_layout_is_global():
    x = rng.normal_ref(1 << 20, seed=7, step=1)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 5e-3 and abs(float(x.std()) - 1) < 5e-3
    # Same global element -> same value, whatever the slice.
    part = rng.normal_ref(1001, seed=7, step=1, first_element=4097)
    assert torch.equal(part, x[4097:5098])
    # Independent of lane pairing: lanes 0/1 share a radius, as Box-Muller pairs do.
    r2 = x[0::4] ** 2 + x[1::4] ** 2
    r0 = rng.normal_ref(4, seed=7, step=1)
    assert math.isclose(float(r2[0]), float(r0[0] ** 2 + r0[1] ** 2), rel_tol=1e-6)
    assert not torch.equal(x[:100], rng.normal_ref(100, seed=7, step=2))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(seed=-1, step=0), "seed"), (dict(seed=2**64, step=0), "seed"), (dict(seed=1.0, step=0), "seed"),
    (dict(seed=0, step=2**32), "step"), (dict(seed=0, step=True), "step"), (dict(seed=0, step=0, offset=-1), "offset"),
])
def test_check_seed_step(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        rng.check_seed_step(**kwargs)
