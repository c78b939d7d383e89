"""Failure paths of train/main.py: invalid configurations stop every rank with a clear message
before any collective (in-process through the real entry point, and one 2-rank launch that must
not hang), and repeated non-finite losses stop the run with its last good checkpoint intact."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ds_launch import MAIN, ROOT, deepspeed_cmd, env, metrics, run, tiny_preset
from speed_fast.training.main import main

CONFIGS = os.path.join(ROOT, "train", "configs")


@pytest.fixture(scope="module")
def data():
    from speed_fast.data import ensure_digits_beton

    return ensure_digits_beton()  # the shared cache: written once per machine


@pytest.fixture
def two_ranks(monkeypatch):
    """The environment of rank 0 of a 2-rank job (validation runs before the process group exists)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.mark.parametrize("args, message", [
    (["--strategy", "bogus"], "--strategy must be one of ('uniform', 'speed', 'p2', 'min_snr', 'lognormal', "
                              "'clts'), got 'bogus'"),
    (["--k", "0.5"], "k must be a finite number in [1.0, inf), got 0.5"),
    (["--lam", "2"], "lam must be a finite number in [0.5, 1.0], got 2.0"),
    (["--strategy", "uniform", "--k", "3"], "unknown parameter(s) ['k'] for strategy 'uniform'"),
    (["--global-batch", "15"], "--global-batch 15 is not divisible by world size x micro batch = 2 x 4 = 8"),
    (["--micro-batch", "0"], "--micro-batch must be an integer >= 1, got 0"),
    (["--data", "/nonexistent/latents.beton"], "--data '/nonexistent/latents.beton': no such file"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    (["--ema-decay", "1.0"], "--ema-decay must be a number in [0.0, 1.0), got 1.0"),
    (["--lr=-1e-4"], "--lr must be a number in (0.0, 1.0], got -0.0001"),
    (["--model", "DiT-M/2"], "model must be one of"),
    (["--backend", "nope"], "--backend 'nope'"),
    (["--resume"], "--resume: no complete checkpoint under"),
])
def test_invalid_values_are_named_and_nothing_starts(tmp_path, data, two_ranks, capsys, args, message):
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    rc = main(["--preset", preset, "--run-dir", str(tmp_path / "run")] + args, CONFIGS)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert not os.path.exists(tmp_path / "run")  # nothing was created


def test_unknown_preset_and_bad_deepspeed_json(tmp_path, data, two_ranks, capsys):
    assert main(["--preset", "nosuch"], CONFIGS) == 2
    assert "--preset 'nosuch': no such preset; available: ['cifar10', 'digits', 'imagenet-dit-s2', 'imagenet-dit-xl2']" \
        in capsys.readouterr().err
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    assert main(["--preset", preset, "--deepspeed_config", str(ds)], CONFIGS) == 2
    assert "train_batch_size = 32 but this run needs 16" in capsys.readouterr().err
    bad = tiny_preset(str(tmp_path / "bad.json"), data, warmup=3)
    assert main(["--preset", bad], CONFIGS) == 2
    assert "unknown key(s) ['warmup']" in capsys.readouterr().err


def test_invalid_config_in_a_two_rank_launch_fails_fast(tmp_path, data):
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    proc = run(deepspeed_cmd(MAIN, ["--preset", preset, "--run-dir", str(tmp_path / "run"), "--global-batch", "15"]),
               timeout=120)  # a hang would time out
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count("is not divisible by world size x micro batch") == 1, err[-3000:]  # rank 0 reports it


def _constant_beton(path, n=64):
    """A latent file whose every sample is the constant 0.5078125 (bf16 bits 0x3F02): easy to find in the file."""
    from speed_fast.data import write_latents

    x = np.full((n, 1, 8, 8), 0.5078125, dtype=np.float32)
    y = np.arange(n) % 10
    write_latents(path, x, y, class_names=[str(i) for i in range(10)])
    return path


def _corrupt_with_nan(path, n=64):
    """Overwrite every stored latent with NaN bit patterns in place (same size: the file still opens)."""
    with open(path, "rb") as f:
        raw = f.read()
    sample = b"\x02\x3f" * 64
    assert raw.count(sample) == n
    with open(path, "wb") as f:
        f.write(raw.replace(sample, b"\xc0\x7f" * 64))


def test_nonfinite_losses_stop_the_run_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    data = _constant_beton(str(tmp_path / "const.beton"))
    preset = tiny_preset(str(tmp_path / "tiny.json"), data, ckpt_every=3)
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, MAIN, "--preset", preset, "--run-dir", run_dir]  # one process, no launcher
    first = subprocess.run(cmd + ["--max-steps", "3"], env=env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = os.path.join(run_dir, "checkpoints", "step-00000003")
    digest = hashlib.sha256(open(os.path.join(ckpt, "model.pt"), "rb").read()).hexdigest()

    # A different run cannot continue this one's checkpoint (checked before anything starts).
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["--preset", preset, "--run-dir", run_dir, "--seed", "1", "--zero-stage", "3"], CONFIGS) == 2
    assert "the run was started with different settings {'seed': '0 -> 1', 'zero_stage': '2 -> 3'}" \
        in capsys.readouterr().err

    _corrupt_with_nan(data)
    second = subprocess.run(cmd + ["--max-steps", "50", "--max-nonfinite", "3"], env=env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 3, second.stderr[-3000:]
    assert ("stopping at step 6: 3 consecutive steps with a non-finite loss (--max-nonfinite 3); no update was "
            f"applied for them. Last good checkpoint: {ckpt}") in second.stderr
    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["nonfinite"] for r in recs] == [False] * 3 + [True] * 3
    assert [r["skipped_steps"] for r in recs[3:]] == [1, 2, 3]
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step-00000003"
    assert hashlib.sha256(open(os.path.join(ckpt, "model.pt"), "rb").read()).hexdigest() == digest
