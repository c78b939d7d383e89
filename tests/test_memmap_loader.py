"""The FFCV-free data path: .beton files written with numpy are byte-identical to FFCV's, and
MemmapLoader hands out LatentLoader's batches bit for bit (order, shards, flips, stored mirrors,
epoch boundaries, a mid-epoch resume), so a run can switch loaders and stay the same run."""

import filecmp
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from speed_fast.data import LatentLoader, MemmapLoader, open_loader, read_latent_meta, resolve_loader, write_latents
from speed_fast.data.latents import fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKER = os.path.join(ROOT, "tests", "no_ffcv")

CASES = [  # (shape, store dtype, stored mirrors, samples)
    ((3, 5, 8), "bfloat16", False, 203),   # rows of 2 x 64-bit words: FFCV's decoder mirrors by words
    ((3, 5, 3), "float32", False, 150),    # odd width: FFCV's decoder mirrors element by element
    ((4, 4, 4), "float16", True, 90),      # stored mirrors: record 2i + flip
    ((4, 64, 64), "bfloat16", False, 70),  # 32 KiB records: 64 per 2 MiB page, a second page
]


def _write(tmp_path, shape, store, copies, n, writer):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(((n, 2) if copies else (n,)) + shape, generator=g) * 2
    path = str(tmp_path / f"{writer}.beton")
    write_latents(path, x, np.arange(n) % 7, class_names=[f"c{i}" for i in range(7)], store_dtype=store,
                  flip_copies=copies, writer=writer, chunk=37)
    return path


@pytest.mark.parametrize("shape,store,copies,n", CASES)
def test_numpy_writer_writes_ffcvs_bytes(tmp_path, shape, store, copies, n):
    pytest.importorskip("ffcv", reason="the FFCV writer is the reference (the ffcv extra)")
    a = _write(tmp_path, shape, store, copies, n, "numpy")
    b = _write(tmp_path, shape, store, copies, n, "ffcv")
    assert filecmp.cmp(a, b, shallow=False)
    assert filecmp.cmp(a + ".json", b + ".json", shallow=False)  # the same size and CRC too
    meta = read_latent_meta(a, verify=True)
    assert {k: v for k, v in fingerprint(a, meta).items() if k != "path"} == \
        {k: v for k, v in fingerprint(b, read_latent_meta(b)).items() if k != "path"}


def _same(xa, xb):
    assert xa.dtype == xb.dtype and xa.shape == xb.shape
    ia = xa.contiguous().view(torch.int16 if xa.element_size() == 2 else torch.int32)
    ib = xb.contiguous().view(torch.int16 if xb.element_size() == 2 else torch.int32)
    return torch.equal(ia, ib)


@pytest.mark.parametrize("shape,store,copies,n", CASES[:3])
@pytest.mark.parametrize("world,rank,drop_last", [(1, 0, True), (2, 1, False), (3, 2, True)])
def test_memmap_batches_equal_ffcv_batches(tmp_path, shape, store, copies, n, world, rank, drop_last):
    path = _write(tmp_path, shape, store, copies, n, "numpy")
    kw = dict(seed=7, rank=rank, world_size=world, flip=True, drop_last=drop_last)
    a, b = LatentLoader(path, 16, num_workers=2, **kw), MemmapLoader(path, 16, **kw)
    assert len(a) == len(b)
    start = min(2, len(a) - 1)
    a.set_epoch(1, start)  # a mid-epoch resume, then across two epoch boundaries
    b.set_epoch(1, start)
    ga, gb = a.forever(), b.forever()
    for _ in range(2 * len(a) + 1):
        (xa, ya), (xb, yb) = next(ga), next(gb)
        assert _same(xa, xb)
        assert torch.equal(ya, yb) and yb.dtype == torch.int64
        assert a.state_dict() == b.state_dict()
    ga.close(), gb.close()


def test_memmap_loader_resumes_from_a_state_dict_and_converts(tmp_path):
    path = _write(tmp_path, (3, 5, 8), "bfloat16", False, 203, "numpy")
    ref = MemmapLoader(path, 10, seed=3, flip=True)
    stream = ref.forever()
    for _ in range(27):  # past the first epoch (20 batches)
        next(stream)
    state = ref.state_dict()
    expected = [next(stream) for _ in range(5)]
    stream.close()
    again = MemmapLoader(path, 10, seed=3, flip=True, out_dtype=torch.float32)
    again.load_state_dict(state)
    got = list(zip(range(5), again.forever()))
    for (x, y), (_, (gx, gy)) in zip(expected, got):
        assert gx.dtype == torch.float32 and torch.equal(x.float(), gx) and torch.equal(y, gy)


def test_open_loader_picks_and_refuses(tmp_path):
    path = _write(tmp_path, (3, 5, 8), "bfloat16", False, 40, "numpy")
    assert isinstance(open_loader(path, 4, loader="memmap"), MemmapLoader)
    with pytest.raises(ValueError, match=r"loader must be one of \['auto', 'ffcv', 'memmap'\], got 'numba'"):
        resolve_loader("numba")


def test_without_ffcv_auto_falls_back_and_ffcv_is_refused(tmp_path):
    """In a process where `import ffcv` fails (tests/no_ffcv on the path), files are still written,
    validated and read; "auto" says once that it uses the memory map; "ffcv" is refused by name."""
    code = f"""
import numpy as np, torch
from speed_fast.data import open_loader, read_latent_meta, resolve_loader, write_latents, MemmapLoader
p = {str(tmp_path / 'x.beton')!r}
write_latents(p, torch.randn(50, 4, 4, 4), np.arange(50) % 3)
read_latent_meta(p, verify=True)
ld = open_loader(p, 8, loader="auto", flip=True)
ld2 = open_loader(p, 8, loader="auto")
assert isinstance(ld, MemmapLoader) and isinstance(ld2, MemmapLoader)
assert sum(x.shape[0] for x, _ in ld) == 48
try:
    resolve_loader("ffcv")
except ValueError as exc:
    print("REFUSED:", exc)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([BLOCKER, ROOT])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("FFCV is not importable") == 1, r.stderr  # said once per process
    assert "the memmap loader reads the data (same batches)" in r.stderr
    assert "REFUSED: loader 'ffcv' asked for, but FFCV does not import here (ImportError: ffcv is blocked" in r.stdout


# Captioned files: (latent shape, store, stored mirrors, samples). With 77 x 32 float16 tokens a record
# is 5120 bytes (4x4x4 bf16 latents): 409 per 2 MiB page, and the 3072 free bytes at a page's end take
# the next record's latent before FFCV restarts that record on the next page (kept in the bytes).
CAPTIONED = [((4, 4, 4), "bfloat16", True, 205), ((3, 5, 8), "float32", False, 150)]


def _write_captioned(tmp_path, shape, store, copies, n, writer):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(((n, 2) if copies else (n,)) + shape, generator=g)
    text = torch.randn(n, 77, 32, generator=g) * 3
    pooled = torch.randn(n, 32, generator=g)
    null = {"tokens": torch.randn(77, 32, generator=g), "pooled": torch.randn(32, generator=g)}
    path = str(tmp_path / f"{writer}-text.beton")
    write_latents(path, x, np.arange(n) % 5, store_dtype=store, flip_copies=copies, writer=writer, chunk=37,
                  text=text, pooled=pooled, text_meta={"encoder": "tiny", "null": null})
    return path, text, pooled, null


@pytest.mark.parametrize("shape,store,copies,n", CAPTIONED)
def test_captioned_file_is_ffcvs_bytes_and_round_trips_its_text(tmp_path, shape, store, copies, n):
    """A captioned .beton is byte for byte FFCV's (tail bytes of a page included), and both loaders
    hand out each sample's text embeddings exactly (float16 of what was written), with the same
    batches; the null caption's embedding comes back from the sidecar exactly too."""
    from speed_fast.data.latents import null_text

    a, text, pooled, null = _write_captioned(tmp_path, shape, store, copies, n, "numpy")
    meta = read_latent_meta(a, verify=True)
    assert meta["text"]["width"] == 32 and meta["text"]["tokens"] == 77 and meta["text"]["encoder"] == "tiny"
    nt, np_ = null_text(meta)
    assert torch.equal(nt, null["tokens"].half()) and torch.equal(np_, null["pooled"].half())
    if importlib.util.find_spec("ffcv") is not None:
        b = _write_captioned(tmp_path, shape, store, copies, n, "ffcv")[0]
        assert filecmp.cmp(a, b, shallow=False)
        assert filecmp.cmp(a + ".json", b + ".json", shallow=False)
    kw = dict(seed=1, rank=1, world_size=2, flip=True, drop_last=False)
    loaders = [MemmapLoader(a, 16, **kw)]
    if importlib.util.find_spec("ffcv") is not None:
        loaders.append(LatentLoader(a, 16, num_workers=2, **kw))
    seen = []
    for loader in loaders:
        idx = loader.sample_indices(0)[0]
        got = [tuple(t.clone() for t in b) for b in loader]  # FFCV's batches are views of rotating buffers
        assert sum(len(b[0]) for b in got) == len(idx)
        tokens = torch.cat([b[2] for b in got])
        pooled_got = torch.cat([b[3] for b in got])
        assert tokens.dtype == torch.float16 and tokens.shape == (len(idx), 77, 32)
        assert torch.equal(tokens, text[idx].half()) and torch.equal(pooled_got, pooled[idx].half())
        seen.append(got)
    for ga, gb in zip(*seen) if len(seen) == 2 else ():
        assert all(_same(u, v) for u, v in zip(ga, gb))


def test_plain_file_still_yields_pairs_and_captioned_sidecar_is_checked(tmp_path):
    path = _write(tmp_path, (3, 5, 8), "bfloat16", False, 40, "numpy")
    assert len(next(iter(MemmapLoader(path, 8)))) == 2
    a = _write_captioned(tmp_path, (4, 4, 4), "bfloat16", False, 30, "numpy")[0]
    with open(a + ".json") as f:
        side = json.load(f)
    side["text"]["null"]["pooled"] = side["text"]["null"]["pooled"][:-8]
    with open(a + ".json", "w") as f:
        json.dump(side, f)
    with pytest.raises(ValueError, match=r"sidecar text.null.pooled is not base64 of 64 bytes"):
        read_latent_meta(a)
    del side["text"]
    with open(a + ".json", "w") as f:
        json.dump(side, f)
    with pytest.raises(ValueError, match=r"has 4 fields, expected 2"):
        read_latent_meta(a)
