"""LatentLoader on real FFCV files: bit-exact batches, flips, sharding across real processes, exact mid-epoch resume.

Each LatentLoader compiles its numba pipeline (about a second here), so loaders are shared at
module scope and the files are tiny. Latents have small odd shapes; W = 8 and W = 3 exercise both of the decoder's mirroring paths.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from speed_fast.data import LatentLoader, ensure_digits_beton, read_latent_meta, write_latents
from speed_fast.data.digits import digits_arrays
from speed_fast.data.loader import epoch_order, shard_indices

N = 203
SHAPE = (3, 5, 8)  # a row is 2 words of 4 bf16: the decoder mirrors it by 64-bit words


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random float32 latents whose labels are their own indices (so y identifies each sample)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((N,) + SHAPE, generator=g) * 3  # (N, C, H, W)
    x[0] = 0.0
    x[1, 0, 0, 0] = -0.0  # signed zero must survive
    labels = np.arange(N)
    path = str(tmp_path_factory.mktemp("lat") / "lat.beton")
    meta = write_latents(path, x, labels)
    return path, x, labels, meta


@pytest.fixture(scope="module")
def flip_loader(data):
    return LatentLoader(data[0], 16, seed=7, flip=True, drop_last=False, num_workers=2)


def collect(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.clone())  # batches are views of FFCV's rotating buffers
        ys.append(y.clone())
    return torch.cat(xs), torch.cat(ys)


def bits(t):
    return t.contiguous().view(torch.int16)


def expected(x_bf16, loader, epoch):
    """The documented order: this rank's indices, each mirrored along W when its flip bit is set."""
    idx, flips = loader.sample_indices(epoch)
    ref = x_bf16[torch.from_numpy(idx)].clone()
    m = torch.from_numpy(flips).bool()
    ref[m] = ref[m].flip(-1)
    return ref, torch.from_numpy(idx)


def test_meta_describes_the_file(data):
    path, x, labels, meta = data
    assert read_latent_meta(path, verify=True) == meta
    assert meta["shape"] == list(SHAPE) and meta["num_samples"] == N and meta["num_records"] == N
    assert meta["store_dtype"] == "bfloat16" and meta["num_classes"] == N and not meta["flip_copies"]
    assert meta["file_bytes"] == os.path.getsize(path)


def test_batches_are_bit_exact_with_flips_over_two_epochs(data, flip_loader):
    path, x, labels, _ = data
    xb = x.to(torch.bfloat16)
    assert len(flip_loader) == -(-N // 16)
    for epoch in (0, 1):
        flip_loader.set_epoch(epoch)
        got_x, got_y = collect(flip_loader)
        ref, idx = expected(xb, flip_loader, epoch)
        assert got_x.dtype == torch.bfloat16 and got_x.shape == (N,) + SHAPE
        assert got_y.dtype == torch.int64 and got_y.shape == (N,)
        assert torch.equal(got_y, idx)
        assert torch.equal(bits(got_x), bits(ref))
        assert sorted(got_y.tolist()) == list(range(N))
    assert flip_loader.state_dict()["epoch"] == 2 and flip_loader.state_dict()["batch"] == 0
    flips0 = flip_loader.sample_indices(0)[1]
    assert 0.3 < flips0.mean() < 0.7  # both copies are used


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, fa = epoch_order(1000, 3, 5, True)
    b, fb = epoch_order(1000, 3, 5, True)
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    assert not np.array_equal(a, epoch_order(1000, 3, 6, True)[0])
    assert not np.array_equal(a, epoch_order(1000, 4, 5, True)[0])
    assert sorted(a.tolist()) == list(range(1000))


@pytest.mark.parametrize("n,world,batch", [(203, 2, 16), (203, 3, 8), (64, 4, 16), (1000, 5, 7)])
def test_rank_shards_are_disjoint_and_cover_the_epoch(n, world, batch):
    # shard_indices is exactly what the loader feeds FFCV; checked here for many shapes without
    # compiling a pipeline per rank (the real-process test below iterates actual batches).
    for drop_last in (False, True):
        shards = [shard_indices(n, batch, seed=11, epoch=4, rank=r, world_size=world, drop_last=drop_last,
                                flip=True)[0] for r in range(world)]
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat)  # disjoint, no sample twice
        if drop_last:
            assert all(len(s) == (n // (world * batch)) * batch for s in shards)
            assert len(flat) == n - n % (world * batch)
        else:
            assert sorted(flat.tolist()) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_two_real_processes_share_an_epoch_exactly_once(data, tmp_path):
    path = data[0]
    script = textwrap.dedent(f"""
        import json, sys
        from speed_fast.data import LatentLoader
        rank = int(sys.argv[1])
        ld = LatentLoader({path!r}, 16, seed=5, rank=rank, world_size=2, flip=True, drop_last=False,
                          num_workers=1)
        out = {{"len": len(ld), "epochs": []}}
        for epoch in range(2):
            ys = []
            for x, y in ld:
                ys += y.tolist()
            out["epochs"].append(ys)
        out["expected"] = [ld.sample_indices(e)[0].tolist() for e in range(2)]
        json.dump(out, open(sys.argv[2], "w"))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / f"r{r}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-2000:]
    res = [json.load(open(tmp_path / f"r{r}.json")) for r in range(2)]
    for epoch in range(2):
        a, b = res[0]["epochs"][epoch], res[1]["epochs"][epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(N))
        assert a == res[0]["expected"][epoch] and b == res[1]["expected"][epoch]
    assert res[0]["epochs"][0] != res[0]["epochs"][1]


def test_mid_epoch_restart_yields_the_same_remaining_batches(data, flip_loader):
    path = data[0]
    flip_loader.set_epoch(3)
    full_x, full_y = collect(flip_loader)
    # Interrupt after 5 batches: the state names the next batch.
    flip_loader.set_epoch(3)
    for b, _ in enumerate(flip_loader):
        if b == 4:
            break
    state = flip_loader.state_dict()
    assert (state["epoch"], state["batch"]) == (3, 5)
    # A fresh process would build a new loader and load the state.
    fresh = LatentLoader(path, 16, seed=7, flip=True, drop_last=False, num_workers=1)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    rest_x, rest_y = collect(fresh)
    assert torch.equal(rest_y, full_y[5 * 16:])
    assert torch.equal(bits(rest_x), bits(full_x[5 * 16:]))
    assert fresh.state_dict()["epoch"] == 4 and fresh.state_dict()["batch"] == 0
    # set_epoch with start_batch is the same thing.
    fresh.set_epoch(3, start_batch=12)
    _, tail_y = collect(fresh)
    assert torch.equal(tail_y, full_y[12 * 16:])


def test_forever_streams_the_same_batches_as_epoch_by_epoch(data, monkeypatch):
    """forever() queues several epochs to one FFCV producer; batches, flips and positions are those
    of the epochs read one by one, across epoch boundaries and producer restarts, from mid-epoch on."""
    import speed_fast.data.loader as loader_mod

    path, x, _, _ = data
    ld = LatentLoader(path, 16, seed=5, rank=1, world_size=2, flip=True, drop_last=True, num_workers=2)
    per_epoch = len(ld)  # 6 batches of 16 of 203 samples over 2 ranks
    monkeypatch.setattr(loader_mod, "EPOCH_SPAN_SAMPLES", 2 * per_epoch * 16)  # a new producer every 2 epochs
    ld.set_epoch(2, start_batch=3)
    want = [collect(ld) for _ in range(4)]  # the rest of epoch 2, then epochs 3, 4, 5
    want_y = torch.cat([y for _, y in want])
    want_x = torch.cat([x for x, _ in want])
    ld.set_epoch(2, start_batch=3)
    got_x, got_y, positions = [], [], []
    for x_b, y_b in ld.forever():
        got_x.append(x_b.clone())
        got_y.append(y_b.clone())
        positions.append((ld.epoch, ld.batch))
        if len(got_y) == want_y.shape[0] // 16:
            break
    assert torch.equal(torch.cat(got_y), want_y)
    assert torch.equal(bits(torch.cat(got_x)), bits(want_x))
    first = [(2, b) for b in range(4, per_epoch)] + [(3, 0)]
    assert positions[:len(first)] == first and positions[-1] == (6, 0)


def test_process_cache_mode_gives_the_same_batches(data):
    # os_cache=False: FFCV loads pages into process memory, planned from record ids without the flip bit.
    path, x, _, _ = data
    ld = LatentLoader(path, 16, seed=7, rank=1, world_size=2, flip=True, drop_last=False, num_workers=2,
                      os_cache=False)
    got_x, got_y = collect(ld)
    ref, idx = expected(x.to(torch.bfloat16), ld, 0)
    assert torch.equal(got_y, idx) and torch.equal(bits(got_x), bits(ref))


def test_flip_copies_pick_the_stored_mirror(tmp_path):
    g = torch.Generator().manual_seed(1)
    both = torch.randn(40, 2, 2, 3, 4, generator=g)  # (N, 2, C, H, W): image, separately encoded mirror
    path = str(tmp_path / "copies.beton")
    meta = write_latents(path, both, np.arange(40) % 3, class_names=["a", "b", "c"], flip_copies=True)
    assert meta["num_samples"] == 40 and meta["num_records"] == 80 and meta["num_classes"] == 3
    ld = LatentLoader(path, 8, seed=2, flip=True, num_workers=1, out_dtype=torch.float32)
    got_x, got_y = collect(ld)
    idx, flips = ld.sample_indices(0)
    ref = both.to(torch.bfloat16).float()[torch.from_numpy(idx), torch.from_numpy(flips).long()]
    assert got_x.dtype == torch.float32 and torch.equal(got_x, ref)
    assert torch.equal(got_y, torch.from_numpy(idx % 3))


@pytest.mark.parametrize("store,shape", [("float16", (1, 2, 3)), ("float32", (2, 1, 4))])
def test_other_store_dtypes_round_trip_with_flips(tmp_path, store, shape):
    # W = 3 mirrors element-wise; float32 with W = 4 mirrors by words of two lanes.
    x = torch.randn((24,) + shape)
    path = str(tmp_path / f"{store}.beton")
    write_latents(path, x.numpy(), np.zeros(24, dtype=np.int64), store_dtype=store)
    ld = LatentLoader(path, 24, num_workers=1, flip=True)
    (got, _), = list((a.clone(), b) for a, b in ld)
    dt = getattr(torch, store)
    assert got.dtype == dt
    ref, _ = expected(x.to(dt), ld, 0)
    assert torch.equal(got, ref)


def test_digits_default_goes_through_writer_and_loader(tmp_path):
    path = ensure_digits_beton(str(tmp_path / "digits.beton"))
    meta = read_latent_meta(path)
    assert meta["num_samples"] == 1797 and meta["num_classes"] == 10 and meta["shape"] == [1, 8, 8]
    assert meta["class_names"] == [str(i) for i in range(10)]
    ld = LatentLoader(path, 256, seed=0, num_workers=1)
    assert len(ld) == 1797 // 256
    x, y = next(iter(ld))
    xs, ys = digits_arrays()
    idx = ld.sample_indices(0)[0][:256]
    assert torch.equal(x, torch.from_numpy(xs[idx]).to(torch.bfloat16))
    assert torch.equal(y, torch.from_numpy(ys[idx]))
    assert x.min() >= -1 and x.max() <= 1
    # A damaged cache is rebuilt, not trusted.
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert ensure_digits_beton(path) == path
    assert read_latent_meta(path, verify=True)["num_samples"] == 1797
