"""Failure paths of train/main.py: invalid configurations stop every rank with a clear message
before any collective (in-process through the real entry point, and one 2-rank launch that must
not hang), and repeated non-finite losses stop the run with its last good checkpoint intact."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from ds_launch import MAIN, ROOT, deepspeed_cmd, env, metrics, run, tiny_preset
from speed_fast.training.config import parse_args, resolve
from speed_fast.training.main import _resume_path, main

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
                              "'clts', 'loss_moment', 'adaptive_speed'), got 'bogus'"),
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
    # Found before any training time is spent (these used to fail after it, or deep inside a rank).
    (["--sample-steps", "banana"], "--sample-steps 'banana': steps must be an integer, 'a,b,...' or 'ddimN'"),
    (["--sample-steps", "2000"], "--sample-steps '2000': steps '2000': cannot take 2000 steps from a section of 1000"),
    (["--eval-sampler", "banana"], "--eval-sampler 'banana': steps must be an integer"),
    (["--eval-every", "10", "--eval-samples", "1"], "--eval-samples must be >= 2"),
    (["--num-workers", "1000"], "--num-workers must be <= "),
    (["--attn-backend", "xformers"], "--attn-backend xformers: attn_backend 'xformers' needs a CUDA device, got cpu"),
])
def test_invalid_values_are_named_and_nothing_starts(tmp_path, data, two_ranks, capsys, args, message):
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    rc = main(["--preset", preset, "--run-dir", str(tmp_path / "run")] + args, CONFIGS)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert not os.path.exists(tmp_path / "run")  # nothing was created


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": "yes"}, "'zero_optimization' must be a JSON object"),
    ({"bf16": "on"}, "'bf16' must be a JSON object"),
    ({"torch_autocast": {"enabled": "on"}}, "torch_autocast.enabled must be true, false or \"auto\", got 'on'"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage must be one of (0, 1, 2, 3), got True"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 but --zero-stage is 2"),
    ({"checkpoint": {"load_universal": True}}, "universal checkpoints"),
])
def test_deepspeed_json_values_are_checked(tmp_path, data, two_ranks, capsys, ds, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    assert main(["--preset", preset, "--deepspeed_config", str(path), "--run-dir", str(tmp_path / "run")],
                CONFIGS) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": "100"}, "max_steps must be int, got '100' (str)"),
    ({"lr": True}, "lr must be float, got True (bool)"),
    ({"flip": 1}, "flip must be bool, got 1 (int)"),
    ({"micro_batch": 4.0}, "micro_batch must be int | None, got 4.0 (float)"),
    ({"sample_steps": 250}, "sample_steps must be str, got 250 (int)"),
    ({"strategy_params": [5]}, "strategy_params must be dict, got [5] (list)"),
    ({"dit": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "learn_sigma": "yes"}},
     "dit: learn_sigma must be bool, got 'yes' (str)"),
])
def test_preset_values_of_the_wrong_type_are_named(tmp_path, data, two_ranks, capsys, overrides, message):
    preset = tiny_preset(str(tmp_path / "tiny.json"), data, **overrides)
    assert main(["--preset", preset, "--run-dir", str(tmp_path / "run")], CONFIGS) == 2
    assert message in capsys.readouterr().err


def test_data_changed_in_place_is_refused_before_training(tmp_path, two_ranks, capsys):
    data = _constant_beton(str(tmp_path / "const.beton"))
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    raw = open(data, "rb").read()
    first = raw.find(b"\x02\x3f" * 64)
    with open(data, "r+b") as f:  # zero two records: same size, FFCV's header and index intact
        f.seek(first)
        f.write(bytes(256))
    assert main(["--preset", preset, "--run-dir", str(tmp_path / "run")], CONFIGS) == 2
    err = capsys.readouterr().err
    assert f"--data: {os.path.realpath(data)}: CRC32 is" in err and "changed or damaged" in err, err
    assert not os.path.exists(tmp_path / "run")


def test_unknown_preset_and_bad_deepspeed_json(tmp_path, data, two_ranks, capsys):
    assert main(["--preset", "nosuch"], CONFIGS) == 2
    presets = sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".json"))  # every train/configs/*.json
    assert {"digits", "digits-unet", "imagenet-dit-xl2", "imagenet-unet-ldm"} <= set(presets)
    assert f"--preset 'nosuch': no such preset; available: {presets}" \
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
    """Overwrite every stored latent with NaN bit patterns in place (same size, header and index) and
    record the new CRC in the sidecar: a file that really holds NaN latents, as a broken encoder writes."""
    with open(path, "rb") as f:
        raw = f.read()
    sample = b"\x02\x3f" * 64
    assert raw.count(sample) == n
    raw = raw.replace(sample, b"\xc0\x7f" * 64)
    with open(path, "wb") as f:
        f.write(raw)
    with open(path + ".json") as f:
        meta = json.load(f)
    meta["crc32"] = zlib.crc32(raw)
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def test_nonfinite_losses_stop_the_run_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    data = _constant_beton(str(tmp_path / "const.beton"))
    preset = tiny_preset(str(tmp_path / "tiny.json"), "const.beton", ckpt_every=3)  # relative to tmp_path
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, MAIN, "--preset", preset, "--run-dir", run_dir]  # one process, no launcher
    first = subprocess.run(cmd + ["--max-steps", "3"], env=env(), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = os.path.join(run_dir, "checkpoints", "step-00000003")
    digest = hashlib.sha256(open(os.path.join(ckpt, "model.pt"), "rb").read()).hexdigest()

    # A different run cannot continue this one's checkpoint (checked before anything starts).
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", preset, "--run-dir", run_dir, "--seed", "1", "--zero-stage", "3"], CONFIGS) == 2
    assert "the run was started with different settings {'seed': '0 -> 1', 'zero_stage': '2 -> 3'}" \
        in capsys.readouterr().err
    assert main(["--preset", preset, "--run-dir", run_dir, "--max-steps", "2"], CONFIGS) == 2
    assert f"--max-steps 2 is below step 3 of the checkpoint {ckpt}" in capsys.readouterr().err
    # The data file is the same file by content, however it is named; another file of that name is not.
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(data, other / "copy.beton")
    shutil.copy(data + ".json", other / "copy.beton.json")
    for spelling in (data, os.path.relpath(data), str(other / "copy.beton")):
        cfg, _ = parse_args(["--preset", preset, "--run-dir", run_dir, "--data", spelling], CONFIGS)
        assert _resume_path(cfg, resolve(cfg, 1, CONFIGS, False), rank=0) == ckpt, spelling
    _constant_beton(str(other / "const.beton"), n=80)
    monkeypatch.chdir(other)  # the preset's relative "const.beton" now names another file
    assert main(["--preset", preset, "--run-dir", run_dir], CONFIGS) == 2
    assert (f"'data': \"'{os.path.realpath(data)}' -> '{os.path.realpath(other / 'const.beton')}' (another file"
            in capsys.readouterr().err)
    monkeypatch.chdir(tmp_path)

    _corrupt_with_nan(data)
    second = subprocess.run(cmd + ["--max-steps", "50", "--max-nonfinite", "3"], env=env(), cwd=tmp_path,
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


def test_json_files_that_are_not_one_object_are_named(tmp_path, data, two_ranks, capsys):
    """Presets and DeepSpeed JSONs go through one reader (speed_fast.jsonfile): not JSON, or not an object."""
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    assert main(["--preset", str(listed)], CONFIGS) == 2
    assert f"preset {listed} holds list, expected a JSON object" in capsys.readouterr().err
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": ')
    preset = tiny_preset(str(tmp_path / "tiny.json"), data)
    assert main(["--preset", preset, "--deepspeed_config", str(broken)], CONFIGS) == 2
    assert f"DeepSpeed config {broken} is not valid JSON (JSONDecodeError: Expecting value" in capsys.readouterr().err
