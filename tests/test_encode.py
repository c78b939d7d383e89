"""`speed-fast encode` and `speed-fast write-latents` end to end, with a tiny random AutoencoderKL saved locally.

Images are generated PNG/JPEG files in class folders (odd sizes, grayscale and RGBA among them),
plus two unreadable files. The .beton is read back by the loader and, independently of it, by
reading the records straight from the file through FFCV's Reader.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from speed_fast.cli import main
from speed_fast.data import LatentLoader, read_latent_meta
from speed_fast.data.encode import center_crop_arr, load_image

RES = 16
BATCH = 4
CLASSES = ["ant", "bee", "cow"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=RES, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """3 classes x 5 readable images, sizes from 16x21 to 70x40; 2 unreadable files in class 'bee'."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(CLASSES):
        os.makedirs(root / cls)
        for i in range(5):
            h, w = 16 + 11 * i, 21 + 7 * ((i + c) % 4)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if i == 1:
                img = img.convert("L")
            if i == 3:
                img = img.convert("RGBA")
            img.save(root / cls / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}")
    (root / "bee" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = (root / "cow" / "img4.jpg").read_bytes()
    (root / "bee" / "cut.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "ant" / "notes.txt").write_text("not an image, ignored")
    return str(root)


def image_list(root):
    """Readable images in encode's order, with labels; and the unreadable ones."""
    good, bad = [], []
    for label, cls in enumerate(CLASSES):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            if not name.endswith((".jpg", ".png")):
                continue
            rel = os.path.join(cls, name)
            (bad if name in ("broken.jpg", "cut.jpg") else good).append((rel, label))
    return good, bad


def reference_latents(root, vae_dir, flip):
    """The documented encode, computed here: batches of BATCH consecutive images, unreadable ones
    dropped from their batch, mean * scaling_factor, bf16. Returns bits [N, (2,) C, h, w] and labels."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    good, bad = image_list(root)
    order = sorted(good + bad, key=lambda t: (t[1], t[0]))
    bad_set = {p for p, _ in bad}
    out, labels = [], []
    with torch.inference_mode():
        for b in range(0, len(order), BATCH):
            batch = [(p, y) for p, y in order[b: b + BATCH] if p not in bad_set]
            if not batch:
                continue
            x = torch.stack([load_image(os.path.join(root, p), RES) for p, _ in batch])
            views = [x, x.flip(-1)] if flip else [x]
            z = [(vae.encode(v).latent_dist.mean * 0.5).to(torch.bfloat16) for v in views]
            out.append(torch.stack(z, 1) if flip else z[0])
            labels += [y for _, y in batch]
    return torch.cat(out).view(torch.int16), torch.tensor(labels)


def read_records(path):
    """Every record of a latent .beton as (int16 bits [R, C, H, W], labels [R]), via FFCV's Reader, no loader."""
    from ffcv.reader import Reader

    meta = read_latent_meta(path)
    r = Reader(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    shape = tuple(meta["shape"])
    itemsize = 4 if meta["store_dtype"] == "float32" else 2
    nbytes = int(np.prod(shape)) * itemsize
    ptrs, labels = r.metadata["f0"], r.metadata["f1"]
    dt = np.float32 if itemsize == 4 else np.int16
    recs = np.stack([raw[p: p + nbytes].view(dt).reshape(shape) for p in ptrs])
    return torch.from_numpy(recs), torch.from_numpy(labels.copy())


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, image_dir, vae_dir):
    out = str(tmp_path_factory.mktemp("enc") / "lat.beton")
    assert run_cli("encode", image_dir, "--vae", vae_dir, "--out", out, "--resolution", RES, "--flip",
                   "--batch-size", BATCH, "--shard-size", 8, "--workers", 0, "--no-progress") == 0
    return out


def test_center_crop_is_adm(tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 40, 3), dtype=np.uint8))
    out = center_crop_arr(img, 16)
    # ADM by hand: 40 >= 32 -> BOX halve to 20x35, then BICUBIC short side to 16 (16x28), center crop.
    step = img.resize((20, 35), resample=Image.BOX)
    step = step.resize((16, round(35 * 16 / 20)), resample=Image.BICUBIC)
    top = (28 - 16) // 2
    assert np.array_equal(np.asarray(out), np.asarray(step)[top: top + 16])
    t = load_image_from(img, tmp_path)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32 and -1 <= t.min() and t.max() <= 1


def load_image_from(img, tmp_path):
    p = tmp_path / "x.png"
    img.save(p)
    return load_image(str(p), 16)


def test_encode_round_trip_is_bit_exact(encoded, image_dir, vae_dir, capsys):
    meta = read_latent_meta(encoded, verify=True)
    good, bad = image_list(image_dir)
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 3
    assert meta["num_samples"] == len(good) == 15 and meta["flip_copies"] and meta["shape"] == [4, 8, 8]
    assert meta["source"]["images_skipped"] == 2
    assert sorted(s["path"] for s in meta["source"]["skipped"]) == sorted(p for p, _ in bad)
    assert not os.path.exists(encoded + ".parts")  # shards are removed once the .beton exists
    ref_bits, ref_labels = reference_latents(image_dir, vae_dir, flip=True)  # (15, 2, 4, 8, 8)
    # The file itself: record 2i is image i, record 2i + 1 its mirror.
    recs, labels = read_records(encoded)
    assert torch.equal(recs.view(15, 2, 4, 8, 8), ref_bits)
    assert torch.equal(labels[::2], ref_labels) and torch.equal(labels[1::2], ref_labels)
    # Through the loader, with the per-epoch flip choosing the stored mirror.
    ld = LatentLoader(encoded, 15, flip=True, drop_last=False, num_workers=1, seed=3)
    (x, y), = [(a.clone(), b.clone()) for a, b in ld]
    idx, flips = ld.sample_indices(0)
    assert x.dtype == torch.bfloat16
    assert torch.equal(x.view(torch.int16), ref_bits[torch.from_numpy(idx), torch.from_numpy(flips).long()])
    assert torch.equal(y, ref_labels[torch.from_numpy(idx)])


def test_unreadable_images_are_reported(image_dir, vae_dir, tmp_path, capsys):
    out = tmp_path / "one.beton"
    assert run_cli("encode", image_dir, "--vae", vae_dir, "--out", out, "--resolution", RES,
                   "--batch-size", 16, "--workers", 0, "--no-progress") == 0
    captured = capsys.readouterr()
    assert "skipping unreadable image bee/broken.jpg" in captured.err
    assert "skipping unreadable image bee/cut.jpg" in captured.err
    assert "skipped 2 unreadable image(s)" in captured.out
    assert read_latent_meta(out)["num_samples"] == 15


def test_interrupted_encode_resumes_without_duplicates_or_drops(image_dir, vae_dir, tmp_path, capsys):
    common = ["--vae", vae_dir, "--resolution", RES, "--batch-size", BATCH, "--shard-size", 8, "--workers", 0,
              "--no-progress", "--sample-posterior", "--seed", 9]
    whole = tmp_path / "whole.beton"
    assert run_cli("encode", image_dir, "--out", whole, *common) == 0
    out = tmp_path / "resumed.beton"
    parts = str(out) + ".parts"
    assert run_cli("encode", image_dir, "--out", out, *common, "--max-images", 4) == 0  # interrupted after 4
    assert not out.exists() and sorted(os.listdir(parts)) == ["manifest.json", "shard-000000000-000000004.npz"]
    # A run killed while writing its next shard leaves only a temporary file, which is discarded.
    with open(os.path.join(parts, ".shard-000000004-000000012.npz.dead.npz"), "wb") as f:
        f.write(b"partial")
    assert run_cli("encode", image_dir, "--out", out, *common, "--max-images", 4) == 0  # 4 more
    assert sorted(os.listdir(parts))[1:] == ["shard-000000000-000000004.npz", "shard-000000004-000000008.npz"]
    # Changed settings refuse to mix with the finished shards.
    assert run_cli("encode", image_dir, "--out", out, *[a if a != 9 else 10 for a in common]) == 2
    assert "seed=9" in capsys.readouterr().err
    assert run_cli("encode", image_dir, "--out", out, *common) == 0
    assert "resuming after 8 of 17 images" in capsys.readouterr().err
    m_whole, m_res = read_latent_meta(whole, verify=True), read_latent_meta(out, verify=True)
    assert m_res["num_samples"] == m_whole["num_samples"] == 15 and m_res["source"]["images_skipped"] == 2
    a, la = read_records(whole)
    b, lb = read_records(out)
    assert torch.equal(a, b) and torch.equal(la, lb)  # same images, once each, same posterior noise
    ref, _ = reference_latents(image_dir, vae_dir, flip=False)
    assert not torch.equal(a, ref)  # sampled, not the mean


def test_killed_encode_resumes_to_the_same_file(encoded, image_dir, vae_dir, tmp_path):
    # A real interruption: the encode runs in its own process and is SIGKILLed once its first
    # shard is on disk (the .beton cannot exist yet: writing it starts by importing FFCV).
    out = tmp_path / "killed.beton"
    parts = str(out) + ".parts"
    args = ["encode", image_dir, "--vae", vae_dir, "--out", out, "--resolution", RES, "--flip",
            "--batch-size", BATCH, "--shard-size", 8, "--workers", 0, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "speed_fast.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(parts) and any(n.startswith("shard-") for n in os.listdir(parts)):
            proc.kill()
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()
    assert run_cli(*args) == 0
    assert read_latent_meta(out, verify=True)["crc32"] == read_latent_meta(encoded)["crc32"]


def test_encode_input_errors(image_dir, vae_dir, tmp_path, capsys):
    assert run_cli("encode", image_dir, "--vae", tmp_path / "nope", "--out", tmp_path / "o.beton") == 2
    err = capsys.readouterr().err
    assert f"--vae '{tmp_path / 'nope'}': no such file or directory; expected a hub id" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert run_cli("encode", image_dir, "--vae", tmp_path, "--out", tmp_path / "o.beton") == 2
    assert "is a directory without config.json" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    assert run_cli("encode", tmp_path / "flat", "--vae", vae_dir, "--out", tmp_path / "o.beton") == 2
    assert "no class sub-folders" in capsys.readouterr().err
    assert not (tmp_path / "o.beton").exists()


def test_write_latents_from_npy_npz_and_fastdit_folder(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 4, 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert run_cli("write-latents", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                   "--out", tmp_path / "a.beton", "--no-progress") == 0
    np.savez(tmp_path / "xy.npz", x=x, y=y, class_names=np.array(["w", "x", "y", "z"]))
    assert run_cli("write-latents", tmp_path / "xy.npz", "--out", tmp_path / "b.beton", "--no-progress") == 0
    # fast-DiT's extract_features.py: <features_path>/imagenet256_features/<i>.npy (1, C, H, W) and
    # imagenet256_labels/<i>.npy (1,), i = 0, 1, ..., paired by name (10.npy sorts after 9.npy).
    feats, labs = tmp_path / "fd" / "imagenet256_features", tmp_path / "fd" / "imagenet256_labels"
    feats.mkdir(parents=True)
    labs.mkdir()
    for i in range(12):
        np.save(feats / f"{i}.npy", x[i: i + 1])
        np.save(labs / f"{i}.npy", y[i: i + 1])
    assert run_cli("write-latents", tmp_path / "fd", "--out", tmp_path / "c.beton", "--no-progress") == 0
    for name in ("a", "b", "c"):
        recs, labels = read_records(tmp_path / f"{name}.beton")
        assert torch.equal(recs, want) and torch.equal(labels, torch.from_numpy(y))
    assert read_latent_meta(tmp_path / "b.beton")["class_names"] == ["w", "x", "y", "z"]
    # Errors name the problem.
    assert run_cli("write-latents", tmp_path / "x.npy", "--out", tmp_path / "d.beton") == 2
    assert "pass their labels with --labels" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", z=x)
    assert run_cli("write-latents", tmp_path / "bad.npz", "--out", tmp_path / "d.beton") == 2
    assert "expected latents under one of ['latents', 'x', 'features']" in capsys.readouterr().err
    os.remove(labs / "3.npy")
    assert run_cli("write-latents", tmp_path / "fd", "--out", tmp_path / "d.beton") == 2
    assert "do not hold the same file names" in capsys.readouterr().err
    assert not (tmp_path / "d.beton").exists()


def test_symlinks_are_followed_once(tmp_path):
    from speed_fast.data.encode import scan_image_folder

    root = tmp_path / "imgs"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    Image.new("RGB", (8, 8)).save(root / "cat" / "sub" / "b.png")
    Image.new("RGB", (8, 8)).save(root / "dog" / "c.png")
    os.symlink(root / "cat", root / "cat" / "sub" / "loop")  # a loop: cat/sub/loop/sub/loop/...
    os.symlink(root / "cat" / "a.png", root / "cat" / "again.png")  # the same file twice
    paths, labels, classes = scan_image_folder(str(root))
    assert classes == ["cat", "dog"]
    assert sorted(zip(paths, labels.tolist())) == [("cat/a.png", 0), ("cat/sub/b.png", 0), ("dog/c.png", 1)]


def test_extreme_images_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (1, 4000)).save(tmp_path / "strip.png")  # 256 x 1024000 after the crop's resize
    with pytest.raises(ValueError, match=r"1x4000 pixels: aspect ratio beyond 32:1"):
        load_image(str(tmp_path / "strip.png"), 256)
    Image.new("L", (9000, 8000)).save(tmp_path / "huge.png")
    with pytest.raises(ValueError, match=r"9000x8000 = 72000000 pixels, more than 67108864"):
        load_image(str(tmp_path / "huge.png"), 256)
    Image.new("RGB", (10, 300)).save(tmp_path / "tall.png")  # 1:30 is still an image
    assert load_image(str(tmp_path / "tall.png"), 16).shape == (3, 16, 16)


def test_encode_device_is_checked(image_dir, vae_dir, tmp_path, capsys):
    assert run_cli("encode", image_dir, "--vae", vae_dir, "--out", tmp_path / "o.beton", "--device", "foo") == 2
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'" in capsys.readouterr().err


def test_write_latents_label_range_and_empty_inputs(tmp_path, capsys):
    x = np.zeros((3, 1, 2, 2), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2**40]))
    assert run_cli("write-latents", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                   "--out", tmp_path / "a.beton") == 2
    assert "labels[2] = 1099511627776; class indices must be < 1048576" in capsys.readouterr().err
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "y.npy", np.array([0, 1, 2]))
    assert run_cli("write-latents", tmp_path / "empty.npy", "--labels", tmp_path / "y.npy",
                   "--out", tmp_path / "a.beton") == 2
    assert f"latents '{tmp_path / 'empty.npy'}' is empty (0 bytes)" in capsys.readouterr().err
    assert run_cli("write-latents", tmp_path / "x.npy", "--labels", tmp_path / "empty.npy",
                   "--out", tmp_path / "a.beton") == 2
    assert "--labels" in capsys.readouterr().err
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    assert run_cli("write-latents", tmp_path / "cut.npz", "--out", tmp_path / "a.beton") == 2
    assert "is not a readable .npy/.npz array" in capsys.readouterr().err
    assert not (tmp_path / "a.beton").exists()


def test_a_fifo_is_never_opened_and_a_second_encode_is_refused(vae_dir, tmp_path, capsys):
    """Issue 22: a FIFO named *.png used to hang encode forever (now skipped, counted, warned); an empty
    class keeps its label and is reported; a second encode of the same --out is refused naming the
    first (it used to resume from the first one's live .parts/ and die on a vanished shard)."""
    import json
    import subprocess
    import sys

    from speed_fast.lockfile import lock_path

    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((RES, RES, 3), 100, np.uint8)).save(root / cls / "0.png")
    os.mkfifo(root / "a" / "pipe.png")
    (root / "c").mkdir()
    out = tmp_path / "lat.beton"
    cmd = [sys.executable, "-m", "speed_fast.cli", "encode", str(root), "--vae", vae_dir, "--out", str(out),
           "--resolution", str(RES), "--workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr
    assert "a/pipe.png" in proc.stderr and "['c']" in proc.stderr
    meta = read_latent_meta(str(out))
    assert meta["num_samples"] == 2 and meta["class_names"] == ["a", "b", "c"]
    assert meta["source"]["not_regular"] == 1 and meta["source"]["empty_classes"] == ["c"]
    before = out.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom speed_fast.lockfile import FileLock\n"
                               "FileLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)",
                               lock_path(str(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert run_cli(*cmd[3:]) == 2
        err = capsys.readouterr().err
        assert "another encode" in err and f"pid {holder.pid}" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    assert out.read_bytes() == before and not os.path.exists(str(out) + ".parts")
    assert json.loads(open(str(out) + ".json").read())["num_samples"] == 2
