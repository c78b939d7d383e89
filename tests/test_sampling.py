"""Samplers: respacing semantics, determinism, exactness on analytic models, guidance on all channels,
and `speed-fast sample` / `speed-fast eval` on a run directory."""

import json
import math

import pytest
import torch

from speed_fast.diffusion import GaussianDiffusion
from speed_fast.sampling import (
    guided_output, make_grid, respace, respaced_diffusion, sample, sample_seed, save_grid, space_timesteps,
)
from speed_fast.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.make("linear", T=1000)


class PointModel(torch.nn.Module):
    """The exact eps predictor when the data distribution of class y is a single point: with
    x_t = sqrt(abar) x* + sqrt(1 - abar) eps, eps = (x_t - sqrt(abar) x*_y) / sqrt(1 - abar).
    Label num_classes (null) has its own point. v is a constant in [-1, 1]."""

    def __init__(self, schedule, points, v=0.0):
        super().__init__()
        self.register_buffer("points", points)  # (num_classes + 1, C, H, W)
        self.register_buffer("abar", schedule.alphas_cumprod.clone())
        self.num_classes = points.shape[0] - 1
        self.in_channels, self.input_size = points.shape[1], points.shape[2]
        self.v = v
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(t.clone())
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = ((x.double() - ab.sqrt() * self.points[y].double()) / (1 - ab).sqrt()).float()
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


class GaussianModel(torch.nn.Module):
    """The exact eps predictor for data x0 ~ N(m, s^2) per element:
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)."""

    def __init__(self, schedule, m, s, v):
        super().__init__()
        self.register_buffer("abar", schedule.alphas_cumprod.clone())
        self.m, self.s, self.v = m, s, v

    def forward(self, x, t, y):
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = ((1 - ab).sqrt() * (x.double() - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)).float()
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


class SmoothModel(torch.nn.Module):
    """A small random network obeying the DiT contract, with v = tanh(.) in [-1, 1]."""

    def __init__(self, channels=1, size=8, num_classes=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes, self.in_channels, self.input_size = num_classes, channels, size
        self.conv = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.emb = torch.nn.Embedding(num_classes + 1, 2 * channels)
        self.temb = torch.nn.Embedding(1000, 2 * channels)

    def forward(self, x, t, y):
        h = 0.3 * self.conv(x) + 0.1 * (self.emb(y) + self.temb(t))[:, :, None, None]
        C = x.shape[1]
        return torch.cat([0.5 * x + h[:, :C], torch.tanh(h[:, C:])], dim=1)


def test_space_timesteps_semantics():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, 250) == kept
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == list(range(1000))
    # Two sections of 5: 2 steps from [0, 5), 3 from [5, 10), ends included.
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    for bad in ("0", "x", "ddim7x", "ddim999"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)
    with pytest.raises(ValueError, match="cannot take 6"):
        space_timesteps(10, "6,1")


def test_respaced_schedule_keeps_the_marginals(schedule):
    kept = space_timesteps(1000, "ddim50")
    respaced, tmap = respace(schedule, kept)
    assert respaced.T == 50 and tmap.tolist() == kept
    torch.testing.assert_close(respaced.alphas_cumprod, schedule.alphas_cumprod[kept], rtol=1e-12, atol=0)
    full, tmap = respace(schedule, range(1000))
    torch.testing.assert_close(full.betas, schedule.betas, rtol=1e-12, atol=1e-15)
    assert tmap.tolist() == list(range(1000))


def test_same_seed_same_images_any_batch_size(schedule):
    model = SmoothModel()
    a = sample(model, schedule, 7, steps=20, seed=3, batch_size=7)
    b = sample(model, schedule, 7, steps=20, seed=3, batch_size=3)
    c = sample(model, schedule, 7, steps=20, seed=4, batch_size=7)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.isfinite(a).all()
    assert (a - c).abs().max() > 0.1
    # Labels drawn per sample are part of the seeded stream too.
    _, ya = sample(model, schedule, 7, steps=2, seed=3, return_labels=True)
    _, yb = sample(model, schedule, 7, steps=2, seed=3, batch_size=2, return_labels=True)
    assert torch.equal(ya, yb)


def test_sample_restores_train_mode_and_does_not_touch_global_rng(schedule):
    model = SmoothModel().train()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    sample(model, schedule, 2, steps=5, seed=0)
    assert torch.equal(torch.rand(3), before)
    assert model.training


def test_ddpm_1000_steps_equals_the_unrespaced_chain(schedule):
    model = SmoothModel(seed=1)
    n, shape = 3, (1, 8, 8)
    got, y = sample(model, schedule, n, steps=1000, seed=5, return_labels=True)
    # The reference chain: the plain diffusion over all T steps, the same per-sample generators.
    diffusion = GaussianDiffusion(schedule, "cpu", learn_sigma=True)
    gens = [torch.Generator().manual_seed(sample_seed(5, i)) for i in range(n)]
    y_ref = torch.cat([torch.randint(10, (1,), generator=g) for g in gens])
    x = torch.stack([torch.randn(shape, generator=g) for g in gens])
    with torch.no_grad():
        for i in reversed(range(1000)):
            t = torch.full((n,), i, dtype=torch.int64)
            out = diffusion.p_mean_variance(model(x, t, y_ref), x, t)
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
            x = out["mean"] + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * out["log_variance"]) * noise
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method,steps", [("ddim", "ddim50"), ("ddim", 1000), ("ddpm", 250), ("ddim", "7"),
                                          ("ddpm", 1)])  # a one-step chain too
def test_single_point_data_is_reached_exactly(schedule, method, steps):
    torch.manual_seed(0)
    points = torch.rand(4, 4, 5, 5) * 2 - 1  # 3 classes + null, 4 channels
    model = PointModel(schedule, points, v=0.3)
    y = torch.tensor([0, 1, 2, 1])
    x0 = sample(model, schedule, 4, y, steps=steps, method=method, seed=1)
    torch.testing.assert_close(x0, points[y], rtol=0, atol=2e-4)
    # The model is called with the original (un-respaced) training steps, 999 first, 0 last.
    kept = space_timesteps(1000, steps)
    assert model.calls[0][0] == kept[-1] and model.calls[-1][0] == 0


def test_guidance_acts_on_all_four_channels(schedule):
    """With single-point classes, guided eps is the exact eps of the point x_u + s (x_c - x_u),
    so DDIM must land there on EVERY channel. DiT's bug (guiding channels 0-2 of 4) would leave
    channel 3 at the conditional point x_c."""
    torch.manual_seed(0)
    points = torch.rand(3, 4, 4, 4) * 2 - 1  # classes 0, 1; null label 2
    model = PointModel(schedule, points)
    s = 1.5
    x0 = sample(model, schedule, 2, torch.tensor([0, 1]), steps="ddim25", method="ddim", cfg_scale=s, seed=0)
    target = points[2] + s * (points[[0, 1]] - points[2])
    torch.testing.assert_close(x0, target, rtol=0, atol=2e-4)
    assert (target[:, 3] - points[[0, 1], 3]).abs().max() > 0.05  # the bug would be visible


def test_guided_output_combines_eps_and_keeps_conditional_sigma():
    C = 4

    def model(x, t, y):
        out = torch.zeros(x.shape[0], 2 * C, 2, 2)
        out[:, :C] = y.float().view(-1, 1, 1, 1)  # eps = label
        out[:, C:] = (y.float() / 10).view(-1, 1, 1, 1)
        return out

    x = torch.zeros(2, C, 2, 2)
    out = guided_output(model, x, torch.zeros(2, dtype=torch.int64), torch.tensor([3, 5]), 4.0, 9, C)
    eps_expected = 9 + 4.0 * (torch.tensor([3.0, 5.0]) - 9)
    torch.testing.assert_close(out[:, :C], eps_expected.view(-1, 1, 1, 1).expand(2, C, 2, 2))
    torch.testing.assert_close(out[:, C:], torch.tensor([0.3, 0.5]).view(-1, 1, 1, 1).expand(2, C, 2, 2))


def _affine_chain_moments(schedule, steps, method, v, m, s):
    """Mean and std of the sampler's output for GaussianModel, propagated in closed form.

    Each step is affine in x_t (x' = A x_t + B + sigma z), so mean and variance follow exactly
    from x_T ~ N(0, 1): the discretisation error of the sampler is part of the prediction."""
    respaced, _ = respace(schedule, space_timesteps(schedule.T, steps))
    ab, ab_prev = respaced.alphas_cumprod.tolist(), respaced.alphas_cumprod_prev.tolist()
    betas, post_var = respaced.betas.tolist(), respaced.posterior_variance.tolist()
    mean, var = 0.0, 1.0
    for i in reversed(range(respaced.T)):
        k = math.sqrt(1 - ab[i]) / (ab[i] * s**2 + 1 - ab[i])  # eps = k (x - sqrt(ab) m)
        # pred_x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) = P x + Q
        P = (1 - math.sqrt(1 - ab[i]) * k) / math.sqrt(ab[i])
        Q = math.sqrt(1 - ab[i]) * k * m
        if method == "ddpm":
            c1 = betas[i] * math.sqrt(ab_prev[i]) / (1 - ab[i])
            c2 = (1 - ab_prev[i]) * math.sqrt(1 - betas[i]) / (1 - ab[i])
            A, B = c1 * P + c2, c1 * Q
            log_small = math.log(post_var[1] if i == 0 else post_var[i])
            frac = (v + 1) / 2
            noise_var = 0.0 if i == 0 else math.exp(frac * math.log(betas[i]) + (1 - frac) * log_small)
        else:  # DDIM, eta = 0: x' = sqrt(ab_prev) pred_x0 + sqrt(1 - ab_prev) eps
            A = math.sqrt(ab_prev[i]) * P + math.sqrt(1 - ab_prev[i]) * k
            B = math.sqrt(ab_prev[i]) * Q - math.sqrt(1 - ab_prev[i]) * k * math.sqrt(ab[i]) * m
            noise_var = 0.0
        mean, var = A * mean + B, A * A * var + noise_var
    return mean, math.sqrt(var)


@pytest.mark.parametrize("method,v,steps", [("ddpm", -1.0, 100), ("ddpm", 1.0, 100), ("ddpm", 0.0, 1000),
                                            ("ddim", 0.0, 100)])
def test_gaussian_data_moments_match_the_closed_form_chain(schedule, method, v, steps):
    """Exact score of N(m, s^2) per element: the sample mean/std must match the chain's own
    closed-form moments within sampling error, and approach (m, s) with 1000 steps."""
    m, s = 0.4, 0.3
    model = GaussianModel(schedule, m, s, v)
    x0 = sample(model, schedule, 64, 0, steps=steps, method=method, seed=2, shape=(1, 8, 8),
                num_classes=1, batch_size=64)
    n = x0.numel()  # 4096 independent values
    mean, std = _affine_chain_moments(schedule, steps, method, v, m, s)
    assert abs(x0.mean().item() - mean) < 4 * std / math.sqrt(n)
    assert abs(x0.std().item() - std) < 4 * std / math.sqrt(2 * n)
    if steps == 1000:
        assert abs(mean - m) < 1e-3 and abs(std - s) < 5e-3


def test_respaced_diffusion_has_the_kept_steps(schedule):
    d = respaced_diffusion(schedule, "ddim10")
    assert d.T == 10 and d.timestep_map.tolist() == list(range(0, 1000, 100))


def test_invalid_arguments_name_the_value(schedule):
    model = SmoothModel()
    with pytest.raises(ValueError, match="method"):
        sample(model, schedule, 2, method="euler")
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(model, schedule, 2, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="seed"):
        sample(model, schedule, 2, seed=-1)
    with pytest.raises(ValueError, match="null label"):
        sample(model, schedule, 2, y=10, cfg_scale=2.0, steps=2)
    with pytest.raises(ValueError, match="labels"):
        sample(model, schedule, 2, y=11, steps=2)


def test_save_grid_layout(tmp_path):
    images = torch.linspace(-1, 1, 5 * 8 * 8).view(5, 1, 8, 8)
    grid = make_grid(images, nrow=3, padding=1, scale=2)
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1, 1) and grid.dtype == torch.uint8
    assert grid[1, 1, 0] == 0 and grid[-2, 2 * 17 - 1, 0] == 255  # first pixel -1, last pixel +1
    path = save_grid(images, str(tmp_path / "sub" / "g.png"), nrow=3)
    from PIL import Image

    assert Image.open(path).size == (3 * 65 + 1, 2 * 65 + 1)
    with pytest.raises(ValueError, match="images must be"):
        make_grid(torch.zeros(2, 4, 8, 8))


def test_real_dit_sampling_is_deterministic_and_guided(schedule):
    from speed_fast.models import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10))
    with torch.no_grad():  # DiT starts with a zero output layer; give it a non-trivial one
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = sample(model, schedule, 5, steps="ddim10", method="ddim", cfg_scale=2.0, seed=1, batch_size=5)
    b = sample(model, schedule, 5, steps="ddim10", method="ddim", cfg_scale=2.0, seed=1, batch_size=2)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    c = sample(model, schedule, 5, steps=10, cfg_scale=1.0, seed=1)  # DDPM, learned sigma from the config
    assert torch.isfinite(c).all() and (c - a).abs().max() > 1e-3


def _tiny_run(run_dir, in_channels, size, seed=0):
    """A run directory in the layout `speed_fast.training.checkpoint.load_for_inference` reads
    (config.json + checkpoints/<tag>/{state.json, model.pt, ema.pt} + latest), holding a tiny
    DiT with random non-zero weights; model.pt and ema.pt differ so --ema is observable."""
    from speed_fast.models import DiT, DiTConfig
    from speed_fast.training.checkpoint import LATEST, STATE_FILE, tag_for

    cfg = DiTConfig(input_size=size, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
                    num_classes=10)
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {k: v + 0.05 for k, v in model.state_dict().items()}
    tag = tag_for(10)
    ckpt = run_dir / "checkpoints" / tag
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    torch.save(ema, ckpt / "ema.pt")
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 10}))
    (run_dir / "checkpoints" / LATEST).write_text(tag)
    config = {"dit_config": cfg.to_dict(),
              "train": {"schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}},
              "data_meta": {"shape": [in_channels, size, size], "num_classes": 10}}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def test_sample_cli_end_to_end_on_digits_shaped_run(tmp_path, capsys):
    from PIL import Image

    from speed_fast.cli import main

    run = _tiny_run(tmp_path / "run", 1, 8)
    out = tmp_path / "grid.png"
    args = ["sample", "--ckpt", str(run), "--num-samples", "6", "--steps", "10", "--cfg", "1.5", "--seed", "3",
            "--out", str(tmp_path / "s.npz"), "--grid", str(out), "--device", "cpu", "--labels", "1,2"]
    assert main(args + ["--ema"]) == 0
    assert Image.open(out).size == (3 * 65 + 1, 2 * 65 + 1)
    import numpy as np

    ema_samples = np.load(tmp_path / "s.npz")["arr_0"]
    assert ema_samples.shape == (6, 8, 8, 3) and ema_samples.dtype == np.uint8
    assert np.load(tmp_path / "s.npz")["arr_1"].tolist() == [1, 2, 1, 2, 1, 2]
    assert main(args + ["--ema", "--overwrite"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], ema_samples)  # same seed, same images
    assert main(args + ["--overwrite"]) == 0  # raw weights: different images
    assert np.abs(np.load(tmp_path / "s.npz")["arr_0"].astype(int) - ema_samples).max() > 0
    # The checkpoint directory itself is accepted too (the same weights: the output is already complete).
    assert main(args[:2] + [str(run / "checkpoints" / "step-00000010")] + args[3:]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such run directory" in capsys.readouterr().err
    # `speed-fast eval` samples a run directory the same way and compares it with digits.
    capsys.readouterr()
    assert main(["eval", "--gen", str(run), "--num-samples", "16", "--steps", "5", "--ref", "digits", "--ema",
                 "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fd_raw"] > 0 and result["n_generated"] == 16 and result["n_reference"] == 1797


def test_sample_cli_decodes_latents_with_a_local_vae(tmp_path, capsys):
    from diffusers.models import AutoencoderKL
    from PIL import Image

    from speed_fast.cli import main

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    run = _tiny_run(tmp_path / "run", 4, 4)  # 4x4x4 latents -> 3x8x8 images
    out = tmp_path / "grid.png"
    base = ["sample", "--ckpt", str(run), "--num-samples", "4", "--steps", "ddim5", "--method", "ddim", "--out", str(out),
            "--device", "cpu"]
    assert main(base) == 2
    assert "pass --vae" in capsys.readouterr().err
    assert main(base[:-4] + ["--out", str(tmp_path / "s.npz"), "--grid", str(out), "--device", "cpu",
                             "--vae", str(tmp_path / "vae")]) == 0
    import numpy as np

    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
    assert Image.open(out).size == (2 * 65 + 1, 2 * 65 + 1)
    assert main(base + ["--vae", str(tmp_path / "missing")]) == 2
    assert "AutoencoderKL directory" in capsys.readouterr().err
