"""The trainer where FFCV cannot be imported (as on the lent GPU image): `train/main.py` with
tests/no_ffcv first on PYTHONPATH trains on the digits default and on a written .beton through the
memmap loader, says so, resumes bit-exactly, and takes the same steps as the FFCV loader would
(every logged loss and the final weights identical)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ds_launch import MAIN, ROOT, env, metrics, tiny_preset

BLOCKER = os.path.join(ROOT, "tests", "no_ffcv")
N = 6
KEYS = ("loss", "mse", "vb", "grad_norm", "loss_acceleration", "loss_deceleration", "loss_convergence")


def train(args, blocked: bool):
    e = env()
    if blocked:
        e["PYTHONPATH"] = os.pathsep.join([BLOCKER, ROOT] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, MAIN, *args], env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stderr


def weights(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        tag = f.read().strip()
    return {name: torch.load(os.path.join(run_dir, "checkpoints", tag, name), weights_only=True)
            for name in ("model.pt", "ema.pt")}


def assert_same_run(a, b, steps):
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, steps + 1))
    for ra, rb in zip(ma, mb):
        for k in KEYS:
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for k in wa[name]:
            assert torch.equal(wa[name][k], wb[name][k]), (name, k)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    base = tmp_path_factory.mktemp("noffcv")
    return base, tiny_preset(str(base / "tiny.json"), "digits", sample_steps="2")


def test_digits_without_ffcv_resumes_bit_exactly_and_matches_ffcv(preset):
    base, p = preset
    with_ffcv, without = str(base / "ffcv"), str(base / "memmap")
    log = train(["--preset", p, "--max-steps", str(N), "--run-dir", with_ffcv, "--loader", "ffcv"], blocked=False)
    assert "memmap" not in log
    first = train(["--preset", p, "--max-steps", str(N // 2), "--run-dir", without], blocked=True)
    assert first.count("[speed_fast] FFCV is not importable (ImportError: ffcv is blocked") == 1, first[-3000:]
    assert "the memmap loader reads the data (same batches)" in first
    second = train(["--preset", p, "--max-steps", str(N), "--run-dir", without], blocked=True)
    assert f"resuming from {os.path.join(without, 'checkpoints', f'step-{N // 2:08d}')}" in second, second[-3000:]
    assert_same_run(with_ffcv, without, N)
    with open(os.path.join(without, "config.json")) as f:
        assert json.load(f)["train"]["loader"] == "auto"


def test_written_beton_with_flips_without_ffcv(preset, tmp_path):
    """`speed-fast write-latents` and training on its file, both without FFCV; the same steps as
    the FFCV loader on the same file (random flips included)."""
    base, p = preset
    g = np.random.default_rng(0)
    np.save(tmp_path / "lat.npy", g.standard_normal((96, 4, 4, 4)).astype(np.float32))
    np.save(tmp_path / "lab.npy", np.arange(96) % 5)
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([BLOCKER, ROOT])
    beton = str(tmp_path / "lat.beton")
    w = subprocess.run([sys.executable, "-m", "speed_fast.cli", "write-latents", str(tmp_path / "lat.npy"),
                        "--labels", str(tmp_path / "lab.npy"), "--out", beton, "--no-progress"],
                       env=e, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert w.returncode == 0, w.stderr[-3000:]
    args = ["--preset", p, "--data", beton, "--flip", "--max-steps", "4"]
    train(args + ["--run-dir", str(tmp_path / "a"), "--loader", "ffcv"], blocked=False)
    log = train(args + ["--run-dir", str(tmp_path / "b")], blocked=True)
    assert "the memmap loader reads the data" in log
    assert_same_run(str(tmp_path / "a"), str(tmp_path / "b"), 4)


def test_loader_ffcv_without_ffcv_is_one_line_and_exit_2(preset, tmp_path):
    _, p = preset
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([BLOCKER, ROOT])
    r = subprocess.run([sys.executable, MAIN, "--preset", p, "--max-steps", "1", "--run-dir", str(tmp_path / "r"),
                        "--loader", "ffcv"], env=e, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("train/main.py: error: --loader: loader 'ffcv' asked for, but FFCV does not import"), \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr
