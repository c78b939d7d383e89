"""Fréchet distance against scipy and closed forms, FID plumbing with a tiny TorchScript net,
the training-time evaluator, quality plots and `speed-fast eval`."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from speed_fast.cli import main as cli_main
from speed_fast.evaluation import (
    InceptionFeatures, InceptionWeightsMissing, RawFeatures, TrainingEvaluator, acceleration_ratio, data_space,
    eval_sampling, feature_stats, frechet_between, frechet_distance, gaussian_stats, load_array, load_inception,
    plot_quality, read_quality, steps_to_reach,
)
from speed_fast.schedule import NoiseSchedule


def scipy_frechet(mu1, s1, mu2, s2):
    """The usual FID formula with scipy's sqrtm (real part), for comparison on well-conditioned inputs."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T


@pytest.mark.parametrize("d", [1, 2, 7, 64])
def test_matches_scipy_sqrtm_on_random_gaussians(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_closed_forms():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    # Identical Gaussians: exactly 0 (never a small negative).
    rng = np.random.default_rng(0)
    s = random_spd(rng, 10)
    mu = rng.normal(size=10)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu, s, mu, s) >= 0.0
    # Commuting covariances (same eigenbasis): sum (sqrt a_i - sqrt b_i)^2.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(6), q @ np.diag(a) @ q.T, np.zeros(6), q @ np.diag(b) @ q.T) == pytest.approx(
        expected, rel=1e-10)


def test_singular_and_near_singular_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    # Rank 3 and rank 5 covariances in the same basis: the closed form still holds, zeros included.
    a = np.r_[rng.uniform(0.5, 2, 3), np.zeros(5)]
    b = np.r_[rng.uniform(0.5, 2, 5), np.zeros(3)]
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(expected, rel=1e-8, abs=1e-10)
    # Sample covariances from fewer samples than dims (the usual small-set FID case): finite,
    # non-negative, and equal to scipy's sqrtm with pytorch-fid's eps offset to its precision.
    x1, x2 = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.1
    mu1, c1 = gaussian_stats(x1)
    mu2, c2 = gaussian_stats(x2)
    ours = frechet_distance(mu1, c1, mu2, c2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offset = np.eye(64) * 1e-6
        ref = scipy_frechet(mu1, c1 + offset, mu2, c2 + offset)
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(ref, rel=1e-3)
    # Near-singular: eigenvalues down to 1e-14 relative, where sqrtm of the product is ill-conditioned.
    w = np.logspace(0, -14, 8)
    s3 = q @ np.diag(w) @ q.T
    assert frechet_distance(np.zeros(8), s3, np.zeros(8), s3) == pytest.approx(0.0, abs=1e-7)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="sigma1 must be symmetric"):
        frechet_distance([0, 0], [[1, 0.5], [0, 1]], [0, 0], np.eye(2))
    with pytest.raises(ValueError, match=r"sigma2 must be \[2, 2\]"):
        frechet_distance([0, 0], np.eye(2), [0, 0], np.eye(3))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance([0, 0], np.eye(2), [0], np.eye(1))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance([np.nan, 0], np.eye(2), [0, 0], np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))


def test_raw_features_and_projection():
    torch.manual_seed(0)
    x = torch.randn(500, 1, 8, 8)
    # Raw space: a constant shift c on 64 dims adds exactly 64 c^2.
    assert frechet_between(x + 0.5, x) == pytest.approx(64 * 0.25, rel=1e-9)
    big = torch.randn(50, 4, 16, 16)
    f = RawFeatures(max_dim=32, seed=3)
    a, b = f(big), RawFeatures(max_dim=32, seed=3)(big)
    assert a.shape == (50, 32) and torch.equal(a, b)
    assert not torch.equal(a, RawFeatures(max_dim=32, seed=4)(big))


class TinyFeatureNet(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same call signature, uint8 RGB in, features out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv(x.to(torch.float32) / 255.0))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


@pytest.fixture
def feature_net_file(tmp_path):
    torch.manual_seed(0)
    net = TinyFeatureNet()
    path = tmp_path / "tiny-inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(path))
    return path, net


def test_fid_plumbing_with_a_saved_feature_net(feature_net_file):
    path, net = feature_net_file
    torch.manual_seed(1)
    gen = torch.rand(40, 1, 8, 8) * 2 - 1  # grayscale: repeated to RGB
    ref = (torch.rand(60, 1, 8, 8) * 2 - 1) * 0.5
    features = InceptionFeatures(path, batch_size=16)
    got = frechet_distance(*feature_stats(gen, features), *feature_stats(ref, features))
    # By hand: uint8 quantisation, channel repeat, the same network.
    def feats(x):
        u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
        with torch.no_grad():
            return net(u8, return_features=True).double().numpy()
    expected = frechet_distance(*gaussian_stats(feats(gen)), *gaussian_stats(feats(ref)))
    assert got == pytest.approx(expected, rel=1e-6)
    assert features.key == "fid"


def test_missing_inception_file_says_where_to_put_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(InceptionWeightsMissing) as info:
        load_inception(missing)
    msg = str(info.value)
    assert str(missing) in msg and "SPEED_FAST_INCEPTION" in msg and "inception-2015-12-05.pt" in msg
    monkeypatch.setenv("SPEED_FAST_INCEPTION", str(missing))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        InceptionFeatures()
    not_script = tmp_path / "weights.pt"
    not_script.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_inception(not_script)


class ExactGaussianModel(torch.nn.Module):
    """Exact eps for per-element N(m, s^2) data; the evaluator must rate it far above a wrong model."""

    def __init__(self, schedule, m, s):
        super().__init__()
        self.register_buffer("abar", schedule.alphas_cumprod.clone())
        self.m, self.s = m, s
        self.num_classes, self.in_channels, self.input_size = 2, 1, 4

    def forward(self, x, t, y):
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = ((1 - ab).sqrt() * (x.double() - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def test_training_evaluator_is_fixed_seed_and_ranks_models():
    schedule = NoiseSchedule.make("linear", T=1000)
    torch.manual_seed(0)
    reference = 0.4 + 0.3 * torch.randn(1000, 1, 4, 4)
    ev = TrainingEvaluator(reference, schedule, n_samples=200, steps="ddim25", seed=7)
    good, bad = ExactGaussianModel(schedule, 0.4, 0.3), ExactGaussianModel(schedule, -0.2, 0.6)
    r1, r2 = ev.evaluate(good, 100), ev.evaluate(good, 200)
    assert r1["fd_raw"] == r2["fd_raw"] and r1["step"] == 100 and r1["eval_samples"] == 200
    assert set(r1) == {"step", "fd_raw", "eval_samples", "eval_s"}
    worse = ev.evaluate(bad, 100)["fd_raw"]
    assert r1["fd_raw"] < 0.1 * worse


def test_plot_quality_and_read_quality(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    rows = [{"step": 1, "loss": 1.0}, {"step": 100, "fd_raw": 5.0}, {"step": 50, "fd_raw": 9.0},
            {"step": 150, "loss": 0.5}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_quality(metrics) == ("fd_raw", [50, 100], [9.0, 5.0])
    out = plot_quality(metrics, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000 and out.endswith("q.png")
    with pytest.raises(ValueError, match="no records with 'fid'"):
        read_quality(metrics, key="fid")


def test_load_array_layouts(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)  # NHWC images
    np.save(tmp_path / "a.npy", u8)
    x, y = load_array(tmp_path / "a.npy")
    assert x.shape == (5, 3, 6, 6) and y is None
    assert x.min() >= -1 and x.max() <= 1
    np.savez(tmp_path / "b.npz", latents=np.zeros((4, 4, 2, 2), np.float32), labels=np.arange(4))
    x, y = load_array(tmp_path / "b.npz")
    assert x.shape == (4, 4, 2, 2) and y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "c.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="expected one of"):
        load_array(tmp_path / "c.npz")


def test_eval_cli_on_arrays(tmp_path, capsys, feature_net_file):
    torch.manual_seed(0)
    np.save(tmp_path / "gen.npy", (torch.rand(64, 1, 8, 8) * 2 - 1).numpy())
    np.save(tmp_path / "ref.npy", (torch.rand(64, 1, 8, 8) * 2 - 1).numpy())
    assert cli_main(["eval", "--gen", str(tmp_path / "gen.npy"), "--ref", str(tmp_path / "ref.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fd_raw"] > 0 and out["n_generated"] == 64
    # Against the embedded digits reference, and FID through the saved feature net.
    assert cli_main(["eval", "--gen", str(tmp_path / "gen.npy"), "--ref", "digits", "--features", "inception",
                     "--inception", str(feature_net_file[0]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fid"] > 0 and out["n_reference"] == 1797
    # A missing Inception file is a clean CLI error, not a traceback.
    assert cli_main(["eval", "--gen", str(tmp_path / "gen.npy"), "--ref", "digits", "--features", "inception",
                     "--inception", str(tmp_path / "missing.pt")]) == 2
    assert "Inception weights not found" in capsys.readouterr().err


def test_acceleration_ratio_interpolates_the_crossing():
    steps = [100, 200, 300, 400]
    baseline = [10.0, 8.0, 6.0, 4.0]
    fast = [9.0, 5.0, 3.0, 2.0]  # crosses 4.0 between 200 (5.0) and 300 (3.0): at 250
    assert steps_to_reach(steps, fast, 4.0) == pytest.approx(250.0)
    r = acceleration_ratio(steps, baseline, fast)
    assert r["baseline_steps"] == 400 and r["ratio"] == pytest.approx(400 / 250) and r["reached"]
    slow = [11.0, 9.0, 7.0, 5.0]
    r = acceleration_ratio(steps, baseline, slow)
    assert r["ratio"] is None and not r["reached"]
    # A baseline that dipped below its final value earlier is credited with the earlier step.
    assert acceleration_ratio(steps, [10.0, 3.0, 5.0, 4.0], fast)["baseline_steps"] == pytest.approx(100 + 100 * 6 / 7)


def test_eval_sampling_clips_pixels_only():
    assert data_space({"shape": [1, 8, 8]}) == "pixels" and data_space({"shape": [3, 32, 32]}) == "pixels"
    assert data_space({"shape": [4, 32, 32]}) == "latents"
    assert data_space({"shape": [3, 32, 32], "space": "latents"}) == "latents"
    assert data_space({"shape": [4, 32, 32], "source": {"space": "pixels"}}) == "pixels"
    with pytest.raises(ValueError, match="space"):
        data_space({"shape": [1, 8, 8], "space": "voxels"})
    assert eval_sampling({"shape": [1, 8, 8]}) == {"steps": "ddim25", "method": "ddim", "clip_denoised": True}
    assert eval_sampling({"shape": [4, 32, 32]})["clip_denoised"] is False
    assert eval_sampling({"shape": [1, 8, 8]}, "250", False) == {"steps": "250", "method": "ddpm",
                                                                  "clip_denoised": False}


@pytest.fixture(scope="module")
def digits_checkpoint():
    """A small digits DiT trained for a few hundred steps (the state in which unclipped DDIM let ~4% of
    samples diverge and the metric swing between sample seeds)."""
    from speed_fast.data.digits import digits_arrays
    from speed_fast.diffusion import GaussianDiffusion
    from speed_fast.models.dit import DiT, DiTConfig
    from speed_fast.ops import FusedSpeeD
    from speed_fast.timesteps import make_strategy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and immune to a busy machine's other jobs
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in digits_arrays())
    model = DiT(DiTConfig(input_size=8, in_channels=1, num_classes=10, hidden_size=64, depth=2, num_heads=2))
    schedule = NoiseSchedule.make("linear")
    fused = FusedSpeeD(schedule, make_strategy("uniform", schedule), backend="torch", seed=0)
    diffusion = GaussianDiffusion(schedule, learn_sigma=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = diffusion.training_losses(model, x[idx], y[idx], fused, step=step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    yield model.eval(), schedule, x
    torch.set_num_threads(threads)


def test_default_metric_is_stable_across_sample_seeds(digits_checkpoint):
    """The evaluator's defaults (DDIM-25, x0 clipped on pixel data): on one checkpoint the Fréchet
    distance varies by at most 15% (coefficient of variation) across 3 sample seeds."""
    model, schedule, data = digits_checkpoint
    settings = eval_sampling({"shape": list(data.shape[1:])})
    assert settings["clip_denoised"] is True
    values = np.array([TrainingEvaluator(data, schedule, n_samples=500, seed=seed, **settings).evaluate(model, 0)["fd_raw"]
                       for seed in range(3)])
    cv = values.std(ddof=1) / values.mean()
    assert np.isfinite(values).all() and cv <= 0.15, (values, cv)
