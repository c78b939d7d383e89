"""Fault injection against the data commands (issue 22): damaged archives, values past the store
dtype, failed writes, FIFOs and odd tar members, one writer per output. Every refusal is exit 2
with one line naming the file or value, and every file that existed before is byte-identical after.
Sizes are tiny (8x8 images) so each case takes seconds."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from speed_fast.atomic import publish
from speed_fast.cli import main as cli_main
from speed_fast.data import read_latent_meta
from speed_fast.lockfile import FileLock, lock_path, output_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(seed, size=8, flat=False):
    arr = np.full((size, size, 3), 7, np.uint8) if flat else \
        np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def image_tar(path, n=10, classes=("a", "b"), mode="w"):
    """A tar of n 8x8 PNGs spread over `classes`; returns the byte offsets of each member's header."""
    with tarfile.open(path, mode) as tar:
        for i in range(n):
            add_bytes(tar, f"{classes[i % len(classes)]}/{i:02d}.png", png(i))
    if mode != "w":
        return []
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def existing_output(tmp_path):
    """A previous output pair whose bytes must survive every refusal."""
    out = tmp_path / "x.beton"
    out.write_bytes(b"old beton bytes")
    (tmp_path / "x.beton.json").write_bytes(b'{"old": "sidecar"}')
    return out


def assert_refused(capsys, code, *names):
    """Exit 2, one line on stderr naming each of `names`, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def assert_untouched(tmp_path, out):
    assert out.read_bytes() == b"old beton bytes"
    assert (tmp_path / "x.beton.json").read_bytes() == b'{"old": "sidecar"}'
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".x.beton", "x.beton")))
    assert [n for n in left if n != "x.beton.lock"] == ["x.beton", "x.beton.json"]  # (a test's dead holder's lock)


def write_pixels(*args):
    return cli_main(["write-pixels", *map(str, args), "--no-progress"])


# 1. damaged archives


def test_an_intact_tar_is_read_whole(tmp_path, capsys):
    image_tar(tmp_path / "ok.tar")
    assert write_pixels(tmp_path / "ok.tar", "--out", tmp_path / "ok.beton") == 0
    meta = read_latent_meta(str(tmp_path / "ok.beton"))
    assert meta["num_samples"] == 10 and meta["class_names"] == ["a", "b"]


@pytest.mark.parametrize("damage", ["header_overwritten", "cut_at_member", "cut_mid_member", "no_end_marker"])
def test_a_damaged_tar_is_refused_not_read_as_a_smaller_dataset(tmp_path, capsys, damage):
    src = tmp_path / "bad.tar"
    offsets = image_tar(src)
    data = bytearray(src.read_bytes())
    if damage == "header_overwritten":
        data[offsets[4]: offsets[4] + 512] = os.urandom(512)
    elif damage == "cut_at_member":
        data = data[: offsets[4]]
    elif damage == "cut_mid_member":
        data = data[: offsets[4] + 700]
    else:  # everything up to the last member's data, without the two zero blocks
        data = data[: offsets[-1] + 1024]
    src.write_bytes(bytes(data))
    out = existing_output(tmp_path)
    line = assert_refused(capsys, write_pixels(src, "--out", out), src)
    assert "damaged or incomplete archive" in line
    assert_untouched(tmp_path, out)


@pytest.mark.parametrize("damage", ["truncated_gz", "garbage", "gz_trailer"])
def test_truncated_gzip_and_garbage_are_one_line(tmp_path, capsys, damage):
    src = tmp_path / ("bad.tar.gz" if damage != "garbage" else "bad.tar")
    if damage == "garbage":
        src.write_bytes(os.urandom(5000))
    else:
        image_tar(src, mode="w:gz")
        data = src.read_bytes()
        if damage == "truncated_gz":
            data = data[: len(data) * 2 // 3]
        else:  # the CRC in the trailer no longer matches
            data = data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]
        src.write_bytes(data)
    out = existing_output(tmp_path)
    assert_refused(capsys, write_pixels(src, "--out", out), src)
    assert_untouched(tmp_path, out)


# 2. values past the store dtype


@pytest.mark.parametrize("dtype,value,store", [(np.float32, 1e5, "float16"), (np.float64, 1e300, "bfloat16"),
                                               (np.float64, 1e39, "float32")])
def test_finite_values_past_the_store_dtype_are_refused(tmp_path, capsys, dtype, value, store):
    x = np.zeros((3, 1, 2, 2), dtype)
    x[1, 0, 1, 0] = -value
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros(3, np.int64))
    out = existing_output(tmp_path)
    code = cli_main(["write-latents", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--out", str(out),
                     "--store-dtype", store, "--no-progress"])
    line = assert_refused(capsys, code, "latents[1]", f"{value:.6g}", store)
    assert "infinity" in line
    assert_untouched(tmp_path, out)


def test_the_largest_finite_value_of_the_store_dtype_is_kept(tmp_path, capsys):
    x = np.full((2, 1, 2, 2), 65504.0, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    assert cli_main(["write-latents", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                     str(tmp_path / "ok.beton"), "--store-dtype", "float16", "--no-progress"]) == 0


def test_longdouble_latents_are_named(tmp_path, capsys):
    from speed_fast.data import write_latents

    with pytest.raises(ValueError, match="extended precision"):
        write_latents(str(tmp_path / "x.beton"), np.zeros((2, 1, 2, 2), np.longdouble), np.zeros(2, np.int64))
    assert not any(tmp_path.iterdir())


# 3. failed writes leave existing files as they were


def test_a_sidecar_that_is_a_directory_leaves_the_old_beton(tmp_path, capsys):
    image_tar(tmp_path / "ok.tar")
    out = tmp_path / "x.beton"
    out.write_bytes(b"old beton bytes")
    (tmp_path / "x.beton.json").mkdir()
    assert_refused(capsys, write_pixels(tmp_path / "ok.tar", "--out", out), "x.beton.json", "directory")
    assert out.read_bytes() == b"old beton bytes" and (tmp_path / "x.beton.json").is_dir()


def test_publish_is_all_or_nothing(tmp_path):
    """The second move fails (its temporary is gone): the first final is put back as it was."""
    (tmp_path / "data").write_bytes(b"old data")
    (tmp_path / "side").write_bytes(b"old side")
    (tmp_path / "data.tmp").write_bytes(b"new data")
    with pytest.raises(FileNotFoundError):
        publish([(str(tmp_path / "data.tmp"), str(tmp_path / "data")),
                 (str(tmp_path / "side.tmp"), str(tmp_path / "side"))])
    assert (tmp_path / "data").read_bytes() == b"old data" and (tmp_path / "side").read_bytes() == b"old side"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "side"]
    (tmp_path / "data.tmp").write_bytes(b"new data")
    (tmp_path / "side.tmp").write_bytes(b"new side")
    publish([(str(tmp_path / "data.tmp"), str(tmp_path / "data")), (str(tmp_path / "side.tmp"), str(tmp_path / "side"))])
    assert (tmp_path / "data").read_bytes() == b"new data" and (tmp_path / "side").read_bytes() == b"new side"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "side"]


# 4. FIFOs, odd tar members, empty classes


def test_a_fifo_named_png_is_skipped_without_being_opened(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        (tmp_path / "imgs" / cls / "0.png").write_bytes(png(0))
    os.mkfifo(tmp_path / "imgs" / "a" / "pipe.png")
    (tmp_path / "imgs" / "empty").mkdir()
    out = tmp_path / "x.beton"
    proc = subprocess.run([sys.executable, "-m", "speed_fast.cli", "write-pixels", str(tmp_path / "imgs"), "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr
    assert "a/pipe.png" in proc.stderr and "not regular files" in proc.stderr
    assert "['empty']" in proc.stderr and "hold no images" in proc.stderr
    meta = read_latent_meta(str(out))
    assert meta["num_samples"] == 2 and meta["class_names"] == ["a", "b", "empty"]
    assert meta["source"]["not_regular"] == 1 and meta["source"]["not_regular_files"] == ["a/pipe.png"]
    assert meta["source"]["empty_classes"] == ["empty"]


def test_links_devices_and_escaping_members_are_counted_never_a_class(tmp_path, capsys):
    src = tmp_path / "odd.tar"
    with tarfile.open(src, "w") as tar:
        for name, i in (("a/0.png", 0), ("b/1.png", 1), ("/abs/x.png", 2), ("../up/y.png", 3), ("a/../../z.png", 4)):
            add_bytes(tar, name, png(i))
        for name, kind in (("a/sym.png", tarfile.SYMTYPE), ("a/hard.png", tarfile.LNKTYPE),
                           ("a/dev.png", tarfile.CHRTYPE), ("a/fifo.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "a/0.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
        info = tarfile.TarInfo("c")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    assert write_pixels(src, "--out", tmp_path / "x.beton") == 0
    err = capsys.readouterr().err
    assert "skipped 7 archive members" in err and "['c']" in err
    meta = read_latent_meta(str(tmp_path / "x.beton"))
    assert meta["class_names"] == ["a", "b", "c"] and meta["num_samples"] == 2
    assert meta["source"]["skipped_members"] == {"absolute or parent-relative path": 3, "symlink": 1, "hardlink": 1,
                                                 "device": 1, "fifo": 1}
    assert meta["source"]["empty_classes"] == ["c"]


def test_decompression_bombs_are_skipped_from_the_header(tmp_path, capsys):
    """Flat 2100x2100 PNGs (4.4 Mpixel, a few KB each; a tar.gz of 20 is tiny) at --resolution 8:
    past the cap of max(4 Mpixel, (32 x 8)^2) pixels, skipped before decoding; the rest is written."""
    big = Image.new("RGB", (2100, 2100), (9, 9, 9))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    src = tmp_path / "bomb.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for i in range(20):
            add_bytes(tar, f"a/big{i:02d}.png", buf.getvalue())
        add_bytes(tar, "a/ok.png", png(0))
        add_bytes(tar, "b/ok.png", png(1))
    assert os.path.getsize(src) < 100_000
    t0 = time.time()
    assert write_pixels(src, "--out", tmp_path / "x.beton", "--resolution", "8") == 0
    assert time.time() - t0 < 60
    meta = read_latent_meta(str(tmp_path / "x.beton"))
    assert meta["num_samples"] == 2 and meta["source"]["skipped"] == 20
    assert "4194304 pixels" in capsys.readouterr().err


# one writer per output


HOLDER = """
import sys, time
from speed_fast.lockfile import FileLock
FileLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_stale_locks_are_taken_over(tmp_path, capsys, monkeypatch):
    image_tar(tmp_path / "ok.tar")
    out = existing_output(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock_path(str(out))], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = assert_refused(capsys, write_pixels(tmp_path / "ok.tar", "--out", out), out, f"pid {holder.pid}")
        assert "another write-pixels" in line
        assert out.read_bytes() == b"old beton bytes"
        monkeypatch.setenv("RANK", "1")  # a job's other ranks never take (or wait for) rank 0's lock
        with output_lock(str(out), "write-pixels") as lock:
            assert lock is None
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv("RANK")
    # The holder died: its lock file still names it, and is taken over.
    with open(lock_path(str(out))) as f:
        assert json.load(f)["pid"] == holder.pid
    assert write_pixels(tmp_path / "ok.tar", "--out", out) == 0
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert read_latent_meta(str(out))["num_samples"] == 10 and not os.path.exists(lock_path(str(out)))


def test_huge_labels_are_reported_as_they_are(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 2, 2), np.float32))
    for labels, shown in ((np.array([0, 1e30]), "labels[1] = 1e+30"),
                          (np.array([0, 2 ** 64 - 1], np.uint64), f"labels[1] = {2 ** 64 - 1}")):
        np.save(tmp_path / "y.npy", labels)
        code = cli_main(["write-latents", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                         str(tmp_path / "z.beton"), "--no-progress"])
        assert shown in assert_refused(capsys, code, "class indices must be <")
    assert not os.path.exists(tmp_path / "z.beton")


def test_a_second_write_latents_is_refused(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 2, 2), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    out = existing_output(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock_path(str(out))], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli_main(["write-latents", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                         str(out), "--no-progress"])
        assert "another write-latents" in assert_refused(capsys, code, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert_untouched(tmp_path, out)


# export-dit: never over a run's files or an existing file; damaged runs named in one line


def small_run(root):
    """A run directory as train/main.py lays it out: config.json and one complete checkpoint."""
    import torch

    from speed_fast.models import DiT, DiTConfig

    cfg = DiTConfig.named("DiT-S/8", input_size=16, in_channels=4, num_classes=10)
    run = root / "run"
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    torch.save(DiT(cfg).state_dict(), ckpt / "ema.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    (run / "config.json").write_text(json.dumps({
        "train": {"schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}},
        "dit_config": cfg.to_dict(), "data_meta": {"num_classes": 10, "shape": [4, 16, 16]}}))
    return run


def test_export_dit_never_writes_into_a_run_or_over_a_file(tmp_path, capsys):
    run = small_run(tmp_path)
    config = (run / "config.json").read_bytes()
    for target in (run / "config.json", run / "checkpoints" / "x.pt", run / "new.pt"):
        line = assert_refused(capsys, cli_main(["export-dit", str(run), str(target)]), target)
        assert "inside the run directory" in line
    assert (run / "config.json").read_bytes() == config and not (run / "new.pt").exists()
    out = tmp_path / "dit.pt"
    out.write_bytes(b"someone's file")
    assert "--force" in assert_refused(capsys, cli_main(["export-dit", str(run), str(out)]), out)
    assert out.read_bytes() == b"someone's file"
    assert cli_main(["export-dit", str(run), str(out), "--force"]) == 0
    assert out.read_bytes() != b"someone's file"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@pytest.mark.parametrize("damage", ["wrong_shape", "no_config", "unknown_key", "config_not_json"])
def test_export_dit_of_a_damaged_run_is_one_line(tmp_path, capsys, damage):
    import torch

    run = small_run(tmp_path)
    if damage == "wrong_shape":
        ema = torch.load(run / "checkpoints" / "step-00000010" / "ema.pt", weights_only=True)
        key = next(k for k, v in ema.items() if v.ndim == 2)
        ema[key] = torch.zeros(3, 7)
        torch.save(ema, run / "checkpoints" / "step-00000010" / "ema.pt")
        expected = "do not load"
    elif damage == "no_config":
        (run / "config.json").unlink()
        expected = "config.json"
    elif damage == "unknown_key":
        config = json.loads((run / "config.json").read_text())
        config["dit_config"]["mystery"] = 1
        (run / "config.json").write_text(json.dumps(config))
        expected = "mystery"
    else:
        (run / "config.json").write_bytes(b"\x80\x03weights")
        expected = "config.json"
    out = tmp_path / "dit.pt"
    assert expected in assert_refused(capsys, cli_main(["export-dit", str(run), str(out)]), run)
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# sample: impossible requests refused up front, outputs published whole, one writer per --out


def sample_run(root):
    """A digits-shaped run (1x8x8 pixels) with a small DiT: config.json and one checkpoint."""
    import torch

    from speed_fast.models import DiT, DiTConfig

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    run = root / "run"
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    torch.save(DiT(cfg).state_dict(), ckpt / "ema.pt")
    torch.save(DiT(cfg).state_dict(), ckpt / "model.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    (run / "config.json").write_text(json.dumps({
        "train": {"schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}},
        "dit_config": cfg.to_dict(), "data_meta": {"num_classes": 10, "shape": [1, 8, 8]}}))
    return run


def test_sample_refuses_what_cannot_fit_before_loading_anything(tmp_path, capsys):
    run = sample_run(tmp_path)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"old grid")
    t0 = time.time()
    line = assert_refused(capsys, cli_main(["sample", "--ckpt", str(run), "--num-samples", str(10 ** 12), "--out",
                                            str(tmp_path / "s.npz"), "--grid", str(grid), "--device", "cpu"]),
                          "--num-samples 1000000000000", "free")
    assert "1x8x8" in line and time.time() - t0 < 30
    assert "--out FILE.npz" in assert_refused(capsys, cli_main(["sample", "--ckpt", str(run), "--num-samples",
                                                                str(10 ** 12), "--out", str(grid), "--device", "cpu"]),
                                              "--num-samples 1000000000000")
    assert not (tmp_path / "s.npz").exists()
    assert "-3" in assert_refused(capsys, cli_main(["sample", "--ckpt", str(run), "--nrow", "-3", "--out", str(grid),
                                                     "--device", "cpu"]), "--nrow")
    (tmp_path / "file").write_bytes(b"")
    assert_refused(capsys, cli_main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "file" / "g.png"),
                                     "--device", "cpu"]), "cannot write")
    assert grid.read_bytes() == b"old grid"


def test_sample_replaces_its_outputs_only_when_both_are_written(tmp_path, capsys):
    run = sample_run(tmp_path)
    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    args = ["sample", "--ckpt", str(run), "--num-samples", "4", "--steps", "2", "--out", str(npz), "--grid", str(grid),
            "--device", "cpu"]
    assert cli_main(args) == 0
    assert np.load(npz)["arr_0"].shape == (4, 8, 8, 3)
    before = grid.read_bytes(), npz.read_bytes()
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock_path(str(npz))], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "another sample" in assert_refused(capsys, cli_main(args + ["--seed", "1", "--overwrite"]),
                                                  f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert (grid.read_bytes(), npz.read_bytes()) == before
    assert cli_main(args + ["--seed", "1", "--overwrite"]) == 0
    assert npz.read_bytes() != before[1]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# eval: headers checked against the file before allocating; a bad --ref named before sampling


def lying_npy(rows=10 ** 12):
    """An .npy whose header declares `rows` x 1x8x8 float32 but holds the data of 2."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, 1, 8, 8)})
    return buf.getvalue() + bytes(2 * 64 * 4)


def test_eval_checks_npy_headers_against_the_file_size(tmp_path, capsys):
    import zipfile

    ref = tmp_path / "ref.npy"
    np.save(ref, np.zeros((4, 1, 8, 8), np.float32))
    (tmp_path / "huge.npy").write_bytes(lying_npy())
    line = assert_refused(capsys, cli_main(["eval", "--gen", str(tmp_path / "huge.npy"), "--ref", str(ref)]),
                          "huge.npy", "declares shape")
    assert "1000000000000" in line
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("samples.npy", lying_npy())
    assert "declares shape" in assert_refused(capsys, cli_main(["eval", "--gen", str(tmp_path / "huge.npz"), "--ref",
                                                                 str(ref)]), "huge.npz")


def test_eval_of_an_empty_array_is_named(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    np.save(tmp_path / "ref.npy", np.zeros((4, 1, 8, 8), np.float32))
    line = assert_refused(capsys, cli_main(["eval", "--gen", str(tmp_path / "empty.npy"), "--ref",
                                            str(tmp_path / "ref.npy")]), "empty.npy", "0 samples")
    assert "torch.cat" not in line


def test_eval_of_a_run_names_a_bad_ref_before_sampling(tmp_path, capsys):
    run = sample_run(tmp_path)
    (tmp_path / "bad.npy").write_bytes(b"not an array at all")
    t0 = time.time()
    assert_refused(capsys, cli_main(["eval", "--gen", str(run), "--num-samples", "10000", "--steps", "1000", "--ref",
                                     str(tmp_path / "bad.npy"), "--device", "cpu"]), "bad.npy")
    assert time.time() - t0 < 30  # 10000 samples x 1000 steps would take far longer


def test_sample_says_which_checkpoint_it_used_when_the_newest_is_damaged(tmp_path, capsys):
    import shutil

    run = sample_run(tmp_path)
    newest = run / "checkpoints" / "step-00000020"
    shutil.copytree(run / "checkpoints" / "step-00000010", newest)
    (newest / "state.json").write_text(json.dumps({"step": 20}))
    with open(newest / "ema.pt", "r+b") as f:
        f.truncate(100)
    (run / "checkpoints" / "latest").write_text("step-00000020\n")
    assert cli_main(["sample", "--ckpt", str(run), "--num-samples", "2", "--steps", "2", "--ema", "--out",
                     str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "using checkpoint step-00000010" in err and "step-00000020" in err


RSS = """
import resource, sys
from speed_fast.cli import main
rc = main(sys.argv[1:])
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


def test_a_large_n_streams_to_disk_with_bounded_memory(tmp_path):
    """8192 samples of 3x64x64 (100 MB as uint8) to --out FILE.npz: the peak resident memory of the
    process stays within 120 MB of drawing 1024 (it held every sample before, +88 MB here), and
    the .npz holds all of them, equal to the smaller set where they overlap."""
    import torch

    from speed_fast.models import DiT, DiTConfig

    cfg = DiTConfig(input_size=64, patch_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                    num_classes=10)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    torch.save(DiT(cfg).state_dict(), ckpt / "model.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    (run / "config.json").write_text(json.dumps({
        "train": {"schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}},
        "dit_config": cfg.to_dict(), "data_meta": {"num_classes": 10, "shape": [3, 64, 64]}}))

    def peak(n, batch):
        proc = subprocess.run([sys.executable, "-c", RSS, "sample", "--ckpt", str(run), "--num-samples", str(n),
                               "--steps", "1", "--batch-size", str(batch), "--out", str(tmp_path / f"s{n}.npz"),
                               "--grid", str(tmp_path / f"g{n}.png"), "--device", "cpu"],
                              capture_output=True, text=True, timeout=400, cwd=ROOT,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split("maxrss_kib")[1].split()[0]) * 1024

    # The same batch size: the per-batch working set (which grows with it) is the same in both.
    small, large = peak(1024, 512), peak(8192, 512)
    assert large - small < 120 * 2 ** 20, (small, large)
    with np.load(tmp_path / "s8192.npz") as z:
        assert z["arr_0"].shape == (8192, 64, 64, 3) and z["arr_1"].shape == (8192,)
        with np.load(tmp_path / "s1024.npz") as z1:
            np.testing.assert_array_equal(z["arr_0"][:1024], z1["arr_0"])
    assert Image.open(tmp_path / "g8192.png").size == (32 * 65 + 1, 32 * 65 + 1)


def test_raw_features_of_large_images_never_hold_the_whole_projection(monkeypatch):
    """eval of 3x1024x1024 arrays needed a 12.9 GB projection matrix before anything was checked; past
    PROJECTION_CACHE_BYTES it is drawn block by block: the same matrix (same generator stream), so
    the same features up to summation order."""
    import torch

    from speed_fast.evaluation import features as feats

    x = torch.randn(5, 3, 20, 20, dtype=torch.float64)
    whole = feats.RawFeatures(max_dim=37, seed=3)(x)
    monkeypatch.setattr(feats, "PROJECTION_CACHE_BYTES", 1024)
    monkeypatch.setattr(feats, "STREAM_BLOCK_BYTES", 37 * 8 * 40)  # 32-row blocks (a multiple of 16)
    streamed_features = feats.RawFeatures(max_dim=37, seed=3)
    streamed = streamed_features(x)
    assert streamed_features._proj is None  # never built whole
    torch.testing.assert_close(streamed, whole, rtol=1e-12, atol=1e-12)
