"""`speed-fast encode` on many processes (speed_fast.data.encode with speed_fast.distributed): two CPU
ranks under torchrun (gloo) write the same bytes as one process; a two-rank encode stopped by
--max-images, then killed midway, resumes to the same bytes, on two ranks or on one; a missing VAE is
said once (exit 2 on each rank), a mismatched one refused; every encode flag passes through torchrun's
and the deepspeed launcher's parsers untouched. A tiny AutoencoderKL, 13 images (10 of them large
JPEGs, so that a kill finds work left)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speed_fast.cli import main
from speed_fast.data import read_latent_meta

ROOT = Path(__file__).resolve().parents[1]
RES = 8
# shards of 3 images, batches of 2: batches are cut inside the shards, the last shard is short, and
# image 6 is unreadable, so ranks hold different counts of latents.
COMMON = ["--resolution", str(RES), "--flip", "--batch-size", "2", "--shard-size", "3", "--workers", "0",
          "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("ddp")
    for name, scale in (("vae", 0.3), ("other-vae", 0.5)):
        torch.manual_seed(0)
        AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                      norm_num_groups=4, sample_size=RES, scaling_factor=scale).save_pretrained(root / name)
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(13):
        folder = images / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        if i == 6:
            (folder / f"{i:02d}.png").write_bytes(b"not a png")
        elif i < 3:
            Image.fromarray(rng.integers(0, 256, (RES + i, RES + 2, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        else:  # large photos (tens of ms to decode and shrink each): a kill lands while work is left
            Image.fromarray(rng.integers(0, 256, (1800 + i, 2400, 3), dtype=np.uint8)).save(
                folder / f"{i:02d}.jpg", quality=90)
    one = root / "one.beton"
    assert encode_one_thread(images, root / "vae", one) == 0
    return root


def encode_one_thread(images, vae, out):
    """A one-process encode with one torch thread, as each torchrun rank below has (OMP_NUM_THREADS=1):
    on the CPU the thread count changes a convolution's summation order, and so some latents' last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["encode", str(images), "--vae", str(vae), "--out", str(out), *COMMON])
    finally:
        torch.set_num_threads(threads)


def torchrun(data, out, *extra, nproc=2, vae="vae", wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "speed_fast.cli", "encode", str(data / "images"), "--vae", str(data / vae), "--out", str(out),
           *COMMON, "--device", "cpu", *map(str, extra)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=str(ROOT))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))


def said(stderr):
    return [line for line in stderr.splitlines() if line.startswith("speed-fast encode: error:")]


def sidecar(path):
    return json.loads(Path(f"{path}.json").read_text())


def test_two_ranks_write_the_bytes_of_one(data, tmp_path):
    out = tmp_path / "two.beton"
    r = torchrun(data, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (data / "one.beton").read_bytes()
    assert sidecar(out) == sidecar(data / "one.beton")
    meta = read_latent_meta(str(out), verify=True)
    assert meta["num_samples"] == 12 and meta["source"]["images_skipped"] == 1
    assert r.stdout.count("wrote ") == 1  # said once, by rank 0
    assert not os.path.exists(f"{out}.parts") and not os.path.exists(f"{out}.lock")


def shards(parts):
    return sorted(n for n in os.listdir(parts) if n.startswith("shard-"))


def test_an_interrupted_two_rank_encode_resumes_to_the_same_bytes(data, tmp_path):
    out = tmp_path / "resumed.beton"
    parts = Path(f"{out}.parts")
    r = torchrun(data, out, "--max-images", 5)
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    # 5 images of the shards [0, 3), [3, 6): the first whole to rank 0, the rest of the budget to rank 1.
    assert shards(parts) == ["shard-000000000-000000003.npz", "shard-000000003-000000005.npz"]
    assert "encoded 5 of 13 images so far" in r.stdout
    elsewhere = Path(f"{tmp_path / 'one-rank.beton'}.parts")
    shutil.copytree(parts, elsewhere)
    # Killed midway: torchrun is stopped (SIGTERM, which it passes to both ranks) once a third shard is on disk.
    job = torchrun(data, out, wait=False)
    try:
        deadline = time.monotonic() + 240
        while job.poll() is None and time.monotonic() < deadline and len(shards(parts)) < 3:
            time.sleep(0.005)
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    left = shards(parts)
    assert not out.exists() and 3 <= len(left) < 6, left  # cut short: shards left to encode
    r = torchrun(data, out)
    assert r.returncode == 0, r.stderr
    assert "resuming after" in r.stderr
    assert out.read_bytes() == (data / "one.beton").read_bytes()
    assert sidecar(out) == sidecar(data / "one.beton")
    # The parts of the --max-images stop finished by one process (a job resumes with any number of ranks).
    assert encode_one_thread(data / "images", data / "vae", tmp_path / "one-rank.beton") == 0
    assert (tmp_path / "one-rank.beton").read_bytes() == (data / "one.beton").read_bytes()


def test_a_missing_or_mismatched_vae_is_one_line_and_exit_2(data, tmp_path, capsys):
    """On two ranks a missing VAE fails both ranks (exit 2 each) and is said once; a VAE other than the one
    an unfinished encode used is refused, naming the difference, and the finished shards are kept."""
    out = tmp_path / "o.beton"
    r = torchrun(data, out, vae="no-such-vae")
    assert r.returncode != 0
    lines = said(r.stderr)
    assert len(lines) == 1 and f"--vae '{data / 'no-such-vae'}': no such file or directory" in lines[0], r.stderr
    # The first rank to fail exits 2; torchrun then stops the other, which has either exited 2 itself or
    # gets SIGTERM (-15) first, a race on a loaded machine. No rank may die any other way.
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)]
    assert 2 in codes and set(codes) <= {2, -15}, r.stderr
    assert "speed_fast/" not in r.stderr  # no traceback from our code
    assert not out.exists()
    assert main(["encode", str(data / "images"), "--vae", str(data / "vae"), "--out", str(out), *COMMON,
                 "--max-images", "3"]) == 0
    capsys.readouterr()
    assert main(["encode", str(data / "images"), "--vae", str(data / "other-vae"), "--out", str(out), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an unfinished encode with vae " in err[0], err
    assert "scaling_factor 0.3 vs 0.5" in err[0] and "latent_channels" not in err[0]
    assert shards(f"{out}.parts") == ["shard-000000000-000000003.npz"] and not out.exists()


def test_pieces_left_are_dealt_after_any_stop():
    """The work left after out-of-order finished shards: each shard minus what is done, in order,
    cut to --max-images; batches stay at multiples of the batch size."""
    from speed_fast.data.encode import _batches, _todo

    done = [(0, 3, ""), (5, 6, ""), (9, 12, "")]
    assert _todo(done, 13, 3, None) == [(3, 5), (6, 9), (12, 13)]
    assert _todo(done, 13, 3, 4) == [(3, 5), (6, 8)]
    assert _todo([], 7, 3, None) == [(0, 3), (3, 6), (6, 7)]
    assert _batches(3, 9, 4) == [[3], [4, 5, 6, 7], [8]]


def _launcher_keeps(parse, flag) -> bool:
    try:
        args = parse(["script.py", flag, "1"])
    except SystemExit:
        return False
    rest = getattr(args, "training_script_args", getattr(args, "user_args", None))
    return rest == [flag, "1"]


def test_no_encode_flag_is_taken_by_a_launcher(capsys):
    """torchrun's and deepspeed's parsers match options after the script name by prefix; an encode
    flag that one of them took (or found ambiguous) would never reach encode."""
    from deepspeed.launcher.runner import parse_args as deepspeed_parse
    from torch.distributed.run import get_args_parser

    import argparse

    from speed_fast.commands.encode import add_arguments

    encode = argparse.ArgumentParser()
    add_arguments(encode)
    flags = sorted(s for a in encode._actions for s in a.option_strings if s.startswith("--") and s != "--help")
    assert "--vae" in flags and "--max-images" in flags and len(flags) >= 13
    taken = [(name, f) for name, parse in (("torchrun", get_args_parser().parse_args),
                                           ("deepspeed", deepspeed_parse))
             for f in flags if not _launcher_keeps(parse, f)]
    capsys.readouterr()
    assert taken == []
    # The check itself sees a clash: `--n` (sample's old flag) is ambiguous to both launchers.
    assert not _launcher_keeps(get_args_parser().parse_args, "--n")
    assert not _launcher_keeps(deepspeed_parse, "--n")
