"""The U-Net backbone (speed_fast.models.unet, issue 20 part 1): DiT's calling convention with a
learned-sigma output and a null class; selection by --model in train/main.py, presets, `speed-fast
plan` and the convergence benchmark, with one-line errors; a real 2-rank `deepspeed train/main.py`
run on digits that resumes bit-exactly, and `speed-fast sample` / `eval` of that run.
(ZeRO-2/3, EMA, distributed evaluation and the bf16 policy with a U-Net: tests/test_train_zero.py.)"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from ds_launch import MAIN, ROOT, deepspeed_cmd, metrics, run, tiny_preset
from speed_fast.models import registry
from speed_fast.models.unet import UNet, UNetConfig
from speed_fast.training.config import parse_args, resolve
from speed_fast.training.config.schema import ConfigError

CONFIGS = os.path.join(ROOT, "train", "configs")
TINY = dict(base_channels=16, channel_mult=[1, 2], layers_per_block=1, attention_levels=[1], norm_groups=8)


def tiny(**overrides):
    return UNetConfig(input_size=8, in_channels=1, num_classes=10, **{**TINY, **overrides})


def test_forward_shapes_learned_sigma_and_null_class():
    torch.manual_seed(0)
    model = UNet(tiny())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])
    out = model(x, t, y)
    assert out.shape == (3, 2, 8, 8)  # eps and the variance interpolation v
    assert torch.count_nonzero(out) == 0  # conv_out starts at zero (LDM/ADM), as DiT's adaLN-Zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drop = torch.tensor([True, False, True])
    null = torch.full_like(y, 10)
    assert torch.equal(model(x, t, y, drop=drop), model(x, t, torch.where(drop, null, y)))
    assert not torch.equal(model(x, t, y), model(x, t, null))  # the label reaches the output
    plain = UNet(tiny(learn_sigma=False, class_dropout_prob=0.0))
    assert plain(x, t, y).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        plain(x, t, y, drop=drop)


def test_named_sizes_and_their_errors():
    sizes = {}
    for name in ("unet-small", "unet-cifar10", "unet-ldm"):
        shape = registry.MADE_FOR[name]
        config = registry.model_config(name, {}, input_size=shape[0], in_channels=shape[1], num_classes=shape[2])
        sizes[name] = registry.describe(name, config)["params"]
    assert sizes == {"unet-small": 703_042, "unet-cifar10": 35_755_398, "unet-ldm": 36_388_616}, sizes
    with pytest.raises(ValueError, match=r"unet-small fixes \['base_channels'\].*'unet-custom'"):
        registry.model_config("unet-small", {"base_channels": 8}, input_size=8, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        registry.model_config("unet-ldm", {}, input_size=12, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match=r"model must be one of \[.*'unet-small'.*\], got 'unet-huge'"):
        registry.family_of("unet-huge")


def test_model_selection_on_the_command_line(capsys):
    # The digits preset is a custom DiT: --model unet-small drops its DiT settings, keeps its class dropout.
    cfg, _ = parse_args(["--model", "unet-small"], CONFIGS)
    assert cfg.dit == {} and cfg.unet == {"class_dropout_prob": 0.1}
    assert cfg.run_dir == os.path.join("runs", "digits-unet-small-speed-seed0")
    plan = resolve(cfg, 1, CONFIGS, False)
    assert isinstance(plan.model, UNetConfig) and (plan.model.base_channels, plan.model.input_size) == (32, 8)
    # The U-Net preset, and back to a DiT from it.
    cfg, _ = parse_args(["--preset", "digits-unet"], CONFIGS)
    assert cfg.model == "unet-small" and resolve(cfg, 1, CONFIGS, False).model == plan.model
    cfg, _ = parse_args(["--preset", "digits-unet", "--model", "DiT-S/2"], CONFIGS)
    assert cfg.unet == {} and cfg.dit == {"class_dropout_prob": 0.1}
    assert resolve(cfg, 1, CONFIGS, False).model.hidden_size == 384
    for flags, message in ((["--model", "unet-huge"], "--model must be one of ["),
                           (["--model", "unet-small", "--attn-backend", "xformers"], "is a U-Net"),
                           (["--model", "unet-small", "--init-from", "x.pt"], "is a U-Net")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
            resolve(parse_args(flags, CONFIGS)[0], 1, CONFIGS, False)
        assert "\n" not in str(info.value)
    # train/main.py itself: one line, exit 2, nothing written.
    from speed_fast.training.main import main

    assert main(["--model", "unet-huge", "--run-dir", "never-written"], CONFIGS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'unet-small'" in err[0] and "got 'unet-huge'" in err[0], err
    assert not os.path.exists("never-written")


def test_plan_describes_a_unet(capsys):
    from speed_fast.cli import main as cli

    assert cli(["plan", "--model", "unet-ldm"]) == 0
    out = capsys.readouterr().out
    assert "unet-ldm  36.39M parameters  input 4x32x32 -> output 8x32x32" in out
    assert cli(["plan", "--model", "unet-ldm", "--in-channels", "3"]) == 0
    assert "input 3x32x32 -> output 6x32x32" in capsys.readouterr().out
    assert cli(["plan", "--model", "unet-huge"]) == 2
    assert "got 'unet-huge'" in capsys.readouterr().err


def test_the_benchmark_passes_the_model():
    path = os.path.join(ROOT, "benchmarks", "bench_convergence.py")
    spec = importlib.util.spec_from_file_location("bench_convergence_unet", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--arms", "uniform,speed_dual", "--model", "unet-small", "--out", "x.json"])
    cmd = bench.trainer_command(args, "d.beton", "speed_dual", 0, "rd")
    cfg, _ = parse_args(cmd[cmd.index("--preset"):], CONFIGS)
    assert cfg.model == "unet-small" and cfg.strategy_params["dual"] is True
    assert bench.expected_train(args, "uniform", 0)["model"] == "unet-small"  # a reused run must match


N = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny U-Net on digits, 2 CPU ranks, ZeRO-2: N steps straight, and N/2 then resumed to N."""
    from speed_fast.data import ensure_digits_beton

    base = tmp_path_factory.mktemp("unet")
    preset = tiny_preset(str(base / "tiny-unet.json"), ensure_digits_beton(), model="unet-custom", dit={}, unet=TINY,
                         sample_steps="5")
    straight, resumed = str(base / "straight"), str(base / "resumed")
    for run_dir, steps, extra in ((straight, N, []), (resumed, N // 2, []), (resumed, N, ["--resume"])):
        proc = run(deepspeed_cmd(MAIN, ["--preset", preset, "--max-steps", str(steps), "--run-dir", run_dir, *extra]),
                   timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"straight": straight, "resumed": resumed, "resume_log": proc.stderr}


def test_a_resumed_unet_run_equals_the_uninterrupted_one(runs):
    assert f"step-{N // 2:08d}" in runs["resume_log"]
    a, b = metrics(runs["straight"]), metrics(runs["resumed"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, N + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "mse", "vb", "grad_norm", "lr", "epoch"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    for name in ("model.pt", "ema.pt"):
        x, y = (torch.load(os.path.join(d, "checkpoints", f"step-{N:08d}", name), weights_only=True)
                for d in (runs["straight"], runs["resumed"]))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_sample_and_eval_a_unet_run(runs, tmp_path, capsys):
    import json

    from speed_fast.cli import main as cli
    from speed_fast.training import load_for_inference

    with open(os.path.join(runs["straight"], "config.json")) as f:
        config = json.load(f)
    assert "unet_config" in config and "dit_config" not in config and config["unet_config"]["base_channels"] == 16
    model, _, _, _ = load_for_inference(runs["straight"], ema=True)
    assert isinstance(model, UNet)
    grid, npz = str(tmp_path / "grid.png"), str(tmp_path / "s.npz")
    assert cli(["sample", "--ckpt", runs["straight"], "--num-samples", "4", "--steps", "3", "--cfg", "1.5",
                "--out", npz, "--grid", grid, "--device", "cpu"]) == 0
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and os.path.isfile(grid)  # ADM's format
    assert (images[..., 1:] == images[..., :1]).all() and labels.shape == (4,)  # 1-channel data repeated to 3
    capsys.readouterr()
    assert cli(["eval", "--gen", runs["straight"], "--n", "20", "--steps", "2", "--ref", "digits", "--json",
                "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(result["fd_raw"]), result
