"""ADM's metrics in `speed-fast eval`: every metric against an independent computation written
differently here (scipy's sqrtm FID, per-row scipy KL for IS, a cdist/sort k-NN ball check for
precision/recall), sFID's spatial features against the network's own forward, the reference cache,
ADM's .npz format, the raw-feature path, bad inputs (one line, exit 2), the flags against torchrun's
and deepspeed's parsers, and a 2-rank torchrun eval equal to the 1-rank one.

The network is a small TorchScript module built here with inception-2015-12-05.pt's structure and
call signature (children `layers.conv ... layers.mixed_10, pool2`, `layers.mixed_6.conv`, `output`;
forward(img, return_features, use_fp16, no_output_bias) with the module's resize and normalisation),
plus a `return_spatial` switch that hands out mixed_6.conv's output from inside its own forward."""

import json
import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from speed_fast.cli import main as cli_main
from speed_fast.evaluation import (InceptionNet, TensorImages, adm_metrics, frechet_distance, inception_score,
                                   manifold_radii, open_images, precision_recall)

NAMES = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed") + tuple(
    f"mixed_{i}" for i in range(1, 11)) + ("pool2",)


def unit(cin, cout, k=1, stride=1):
    conv = nn.Conv2d(cin, cout, k, stride)
    nn.init.normal_(conv.weight, std=1.5 / (cin * k * k) ** 0.5)  # keeps the signal alive through 18 layers
    nn.init.normal_(conv.bias, std=0.1)
    return nn.Sequential(conv, nn.Tanh())


class Mixed6(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = unit(c, 9)
        self.tower = unit(c, 3)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


class TinyInception(nn.Module):
    """inception-2015-12-05.pt's shape in miniature (299 -> 5x5 at mixed_6, 12-d pool, 10 classes)."""

    def __init__(self, scale_features: float = 1.0):
        super().__init__()
        c = 6
        mods = {"conv": unit(3, 4, 3, 2), "conv_1": unit(4, 4, 3, 2), "conv_2": unit(4, 4), "pool0": nn.MaxPool2d(3, 2),
                "conv_3": unit(4, 5), "conv_4": unit(5, c, 3, 2), "pool1": nn.MaxPool2d(3, 3)}
        mods.update({n: unit(c, c) for n in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5")})
        mods["mixed_6"] = Mixed6(c)
        mods.update({f"mixed_{i}": unit(12, 12) for i in range(7, 11)})
        mods["pool2"] = nn.AdaptiveAvgPool2d(1)
        self.layers = nn.Sequential()
        for name in NAMES:
            self.layers.add_module(name, mods[name])
        self.output = nn.Linear(12, 10)
        nn.init.normal_(self.output.weight, std=3.0)  # peaked class probabilities: an IS well above 1
        self.scale_features = scale_features

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False, return_spatial: bool = False) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.unsqueeze(0).repeat([batch_size, 1, 1])
        grid = F.affine_grid(theta, [batch_size, channels, 299, 299], False)
        x = F.grid_sample(x, grid, "bilinear", "border", False)
        x = (x - 128) / 128
        n = self.layers
        x = n.pool1(n.conv_4(n.conv_3(n.pool0(n.conv_2(n.conv_1(n.conv(x)))))))
        x = n.mixed_5(n.mixed_4(n.mixed_3(n.mixed_2(n.mixed_1(n.mixed(x))))))
        spatial = n.mixed_6.conv(x)
        x = n.pool2(n.mixed_10(n.mixed_9(n.mixed_8(n.mixed_7(n.mixed_6(x))))))
        if return_spatial:
            return spatial
        features = x.reshape(batch_size, -1) * self.scale_features
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return torch.softmax(logits, 1)


def save_script(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    module = TinyInception().eval()
    return module, save_script(module, tmp_path_factory.mktemp("net") / "tiny-inception.pt")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPEED_FAST_OFFLINE", "1")
    monkeypatch.delenv("SPEED_FAST_INCEPTION", raising=False)


def images(seed, n, size=12, lo=0, hi=256):
    return np.random.default_rng(seed).integers(lo, hi, size=(n, size, size, 3), dtype=np.uint8)  # ADM: NHWC


def scipy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def brute_pr(ref, gen, k=3):
    """Precision/recall by explicit balls: Euclidean cdist, each radius the k-th other neighbour's distance."""
    def radii(x):
        d = scipy.spatial.distance.cdist(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    r_ref, r_gen = radii(ref), radii(gen)
    precision = np.mean([any(np.linalg.norm(g - ref[i]) <= r_ref[i] for i in range(len(ref))) for g in gen])
    recall = np.mean([any(np.linalg.norm(r - gen[j]) <= r_gen[j] for j in range(len(gen))) for r in ref])
    return precision, recall


def module_features(module, arr):
    """The module's own pool features, spatial (first 7 channels, H W C order) and probabilities."""
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        pool = module(x, return_features=True).double().numpy()
        sp = module(x, return_spatial=True)[:, :7].permute(0, 2, 3, 1).reshape(len(arr), -1).double().numpy()
        probs = module(x, no_output_bias=True).double().numpy()
    return pool, sp, probs


# ---- the metric functions ----------------------------------------------------------------------

def test_inception_score_is_the_mean_over_splits_of_exp_mean_kl():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(23, 7)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for part in (probs[0:10], probs[10:20], probs[20:23]):  # split_size 10: 10, 10, 3 (the rest counts fully)
        marginal = part.mean(0)
        expected.append(np.exp(np.mean([scipy.stats.entropy(p, marginal) for p in part])))
    assert inception_score(probs, split_size=10) == pytest.approx(np.mean(expected), rel=1e-12)
    # Known answers: every sample sure of its own class among K used equally -> K; all alike -> 1.
    assert inception_score(np.eye(7)[np.arange(70) % 7]) == pytest.approx(7.0, rel=1e-12)
    assert inception_score(np.tile(probs[:1], (40, 1))) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(probs, split_size=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_precision_recall_match_explicit_balls(dtype):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 5))
    gen = np.concatenate([rng.normal(size=(30, 5)), rng.normal(loc=1.5, size=(25, 5))])  # half on, half off
    got = precision_recall(ref, gen, k=3, dtype=dtype)
    want = brute_pr(ref, gen)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.3 < got[0] < 0.9 and 0 < got[1] < 1  # not a degenerate case
    # Radii: the 3rd nearest other point's squared distance.
    d = scipy.spatial.distance.cdist(ref, ref)
    np.testing.assert_allclose(manifold_radii(ref, 3, dtype=torch.float64).numpy(), np.sort(d, 1)[:, 3] ** 2, rtol=1e-9)


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 4 generated"):
        precision_recall(x, x[:3])


# ---- the network: pool, sFID's spatial features, IS probabilities ------------------------------------

def test_network_gives_its_own_pool_spatial_and_probabilities(tiny):
    module, path = tiny
    arr = images(3, 9, size=21)
    net = InceptionNet(path)
    pool, spatial = net.extract(torch.from_numpy(arr).permute(0, 3, 1, 2))
    own_pool, own_spatial, own_probs = module_features(module, arr)
    assert net.spatial_unavailable is None and spatial.shape == (9, 7 * 5 * 5)
    np.testing.assert_allclose(pool.numpy(), own_pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial.numpy(), own_spatial, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.probabilities(pool).numpy(), own_probs, rtol=1e-5, atol=1e-7)


def test_a_forward_that_is_not_the_layer_chain_reports_sfid_unavailable(tmp_path):
    torch.manual_seed(0)
    module = TinyInception(scale_features=2.0).eval()
    net = InceptionNet(save_script(module, tmp_path / "odd.pt"))
    arr = images(4, 5)
    pool, spatial = net.extract(torch.from_numpy(arr).permute(0, 3, 1, 2))
    assert spatial is None and "differs from the module's forward" in net.spatial_unavailable
    np.testing.assert_allclose(pool.numpy(), module_features(module, arr)[0], rtol=1e-5)  # the module's own


# ---- adm_metrics end to end ------------------------------------------------------------------------

def test_every_metric_against_an_independent_computation(tiny, tmp_path):
    module, path = tiny
    gen_arr, ref_arr = images(5, 24, lo=40, hi=256), images(6, 30)
    np.savez(tmp_path / "gen.npz", arr_0=gen_arr, arr_1=np.arange(24))
    np.savez(tmp_path / "ref.npz", arr_0=ref_arr)
    net = InceptionNet(path)
    gen, ref = open_images(tmp_path / "gen.npz", "--gen"), open_images(tmp_path / "ref.npz", "--ref")
    got = adm_metrics(gen, ref, net, batch_size=7, split_size=10, reference_path=str(tmp_path / "ref.npz"))
    g_pool, g_sp, g_probs = module_features(module, gen_arr)
    r_pool, r_sp, _ = module_features(module, ref_arr)
    assert got["fid"] == pytest.approx(scipy_fid(g_pool, r_pool), rel=1e-5, abs=1e-9)
    assert got["sfid"] == pytest.approx(frechet_distance(g_sp.mean(0), np.cov(g_sp, rowvar=False),
                                                         r_sp.mean(0), np.cov(r_sp, rowvar=False)), rel=1e-5)
    expected_is = np.mean([np.exp(np.mean([scipy.stats.entropy(p, part.mean(0)) for p in part]))
                           for part in (g_probs[:10], g_probs[10:20], g_probs[20:])])
    assert got["is"] == pytest.approx(expected_is, rel=1e-5)
    assert (got["precision"], got["recall"]) == pytest.approx(brute_pr(r_pool, g_pool), abs=1e-12)
    assert got["reference_cache"] == "written" and got["n_generated"] == 24 and got["n_reference"] == 30
    # The second run reads the reference from the cache (a renamed copy hits: the key is the content).
    os.replace(tmp_path / "ref.npz", tmp_path / "ref2.npz")
    again = adm_metrics(open_images(tmp_path / "gen.npz", "--gen"), open_images(tmp_path / "ref2.npz", "--ref"), net,
                        batch_size=5, split_size=10, reference_path=str(tmp_path / "ref2.npz"))
    assert again["reference_cache"] == "read"
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert again[key] == pytest.approx(got[key], rel=1e-6, abs=1e-9), key
    # Identical sets: FID and sFID 0, precision and recall 1.
    same = adm_metrics(gen, gen, net, batch_size=8)
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["sfid"] == pytest.approx(0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0


def test_stored_reference_statistics_are_used_for_fid_and_sfid(tiny, tmp_path):
    module, path = tiny
    gen_arr, ref_arr = images(7, 12), images(8, 12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 12)), rng.normal(size=(175, 175))
    stored = dict(mu=rng.normal(size=12), sigma=a @ a.T, mu_s=rng.normal(size=175), sigma_s=b @ b.T)
    np.savez(tmp_path / "ref.npz", arr_0=ref_arr, **stored)
    np.save(tmp_path / "gen.npy", gen_arr)
    net = InceptionNet(path)
    gen, ref = open_images(tmp_path / "gen.npy", "--gen"), open_images(tmp_path / "ref.npz", "--ref")
    got = adm_metrics(gen, ref, net, reference_statistics="stored")
    g_pool, g_sp, _ = module_features(module, gen_arr)
    r_pool, r_sp, _ = module_features(module, ref_arr)
    assert got["fid"] == pytest.approx(frechet_distance(g_pool.mean(0), np.cov(g_pool, rowvar=False),
                                                        stored["mu"], stored["sigma"]), rel=1e-6)
    assert got["sfid"] == pytest.approx(frechet_distance(g_sp.mean(0), np.cov(g_sp, rowvar=False),
                                                         stored["mu_s"], stored["sigma_s"]), rel=1e-6)
    assert (got["precision"], got["recall"]) == pytest.approx(brute_pr(r_pool, g_pool), abs=1e-12)  # from arr_0
    assert "TensorFlow" in got["reference_statistics"]
    # The default is ADM's rule: stored statistics whenever the file has them.
    auto = adm_metrics(gen, ref, net)
    assert all(auto[key] == got[key] for key in ("fid", "sfid", "is", "precision", "recall"))
    # recompute ignores them: the reference images' own statistics.
    own = adm_metrics(gen, ref, net, reference_statistics="recompute")
    assert own["fid"] == pytest.approx(scipy_fid(g_pool, r_pool), rel=1e-5)
    assert own["sfid"] == pytest.approx(scipy_fid(g_sp, r_sp), rel=1e-5) and "recomputed" in own["reference_statistics"]
    # Stored statistics of another network's size: auto recomputes and says why, stored refuses.
    np.savez(tmp_path / "other.npz", arr_0=ref_arr, **{**stored, "mu": np.zeros(2048), "sigma": np.eye(2048)})
    other = open_images(tmp_path / "other.npz", "--ref")
    fallback = adm_metrics(gen, other, net)
    assert fallback["fid"] == own["fid"] and "stored mu is [2048] but this network gives [12]" in (
        fallback["reference_statistics"])
    with pytest.raises(ValueError, match=r"stored mu is \[2048\].*--ref-stats recompute"):
        adm_metrics(gen, other, net, reference_statistics="stored")


def test_ieee_fp32_turns_tf32_off_and_restores_the_setting():
    """InceptionNet.extract runs inside it: torch enables TF32 for cuDNN convolutions by default."""
    from speed_fast.evaluation.inception import ieee_fp32

    conv = torch.backends.cudnn.conv
    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    seen = []
    with ieee_fp32():
        seen.append((conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
    assert seen == [("ieee", "ieee")]
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with pytest.raises(RuntimeError), ieee_fp32():
        raise RuntimeError("restored on errors too")
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_image_files_in_every_layout_read_the_same(tmp_path):
    u8 = images(9, 6, size=5)                                         # NHWC uint8 (ADM)
    np.savez(tmp_path / "stored.npz", arr_0=u8)
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=u8)          # streamed, not mapped
    np.save(tmp_path / "nchw.npy", u8.transpose(0, 3, 1, 2))
    np.save(tmp_path / "float.npy", u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    np.savez(tmp_path / "save.npz", samples=u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1,
             labels=np.arange(6))                                     # the older `sample --save` file
    np.savez(tmp_path / "sample_out.npz", arr_0=u8, arr_1=np.arange(6))  # `sample --out`: ADM's, labels in arr_1
    want = torch.from_numpy(u8).permute(0, 3, 1, 2)
    for name in ("stored.npz", "deflated.npz", "nchw.npy", "float.npy", "save.npz", "sample_out.npz"):
        s = open_images(tmp_path / name, "--gen")
        assert (s.n, s.shape) == (6, (3, 5, 5))
        got = torch.cat(list(s.batches(range(2, 6), 3)))
        assert torch.equal(got, want[2:6]), name
    with zipfile.ZipFile(tmp_path / "stored.npz") as z:
        assert z.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    assert TensorImages(want.float() / 127.5 - 1, "t").shape == (3, 5, 5)


# ---- the command ---------------------------------------------------------------------------------

def run_eval(capsys, *argv):
    code = cli_main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_cli_prints_the_table_and_json(tiny, tmp_path, capsys):
    _, path = tiny
    np.savez(tmp_path / "gen.npz", arr_0=images(10, 16))
    np.savez(tmp_path / "ref.npz", arr_0=images(11, 16))
    args = ["--gen", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "--features", "inception",
            "--inception", path, "--device", "cpu"]
    code, out, err = run_eval(capsys, *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"fid", "sfid", "is", "precision", "recall"} <= set(result) and result["sfid"] > 0 and result["is"] >= 1
    code, out, err = run_eval(capsys, *args)
    assert code == 0 and "sFID" in out and "Inception Score" in out and "precision" in out
    assert f"{result['fid']:.6g}" in out and "cache read" in out


def test_raw_features_report_precision_and_recall(tmp_path, capsys):
    rng = np.random.default_rng(3)
    gen, ref = rng.normal(size=(30, 1, 3, 3)).astype(np.float32), rng.normal(size=(40, 1, 3, 3)).astype(np.float32)
    np.save(tmp_path / "gen.npy", gen)
    np.save(tmp_path / "ref.npy", ref)
    code, out, err = run_eval(capsys, "--gen", tmp_path / "gen.npy", "--ref", tmp_path / "ref.npy", "--json")
    assert code == 0, err
    result = json.loads(out)
    g, r = gen.reshape(30, -1).astype(np.float64), ref.reshape(40, -1).astype(np.float64)
    assert result["fd_raw"] == pytest.approx(scipy_fid(g, r), rel=1e-6)
    assert (result["precision"], result["recall"]) == pytest.approx(brute_pr(r, g), abs=1e-12)
    assert result["sfid"] is None and "spatial" in result["sfid_unavailable"] and result["is"] is None
    # `sample --out`'s format (ADM's arr_0 uint8 [N, H, W, 3], labels in arr_1) reads as images in [-1, 1].
    u8 = np.random.default_rng(4).integers(0, 256, size=(2, 20, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "gen.npz", arr_0=u8[0], arr_1=np.arange(20))
    np.savez(tmp_path / "ref.npz", arr_0=u8[1], arr_1=np.arange(20))
    code, out, err = run_eval(capsys, "--gen", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "--json")
    assert code == 0, err
    result = json.loads(out)
    g, r = (u8.transpose(0, 1, 4, 2, 3).reshape(2, 20, -1) / 127.5 - 1).astype(np.float32).astype(np.float64)
    assert result["fd_raw"] == pytest.approx(scipy_fid(g, r), rel=1e-5)
    assert (result["precision"], result["recall"]) == pytest.approx(brute_pr(r, g), abs=1e-12)


def test_bad_inputs_are_one_line_and_exit_2(tiny, tmp_path, capsys):
    _, path = tiny
    np.savez(tmp_path / "gen.npz", arr_0=images(12, 8))
    np.savez(tmp_path / "small.npz", arr_0=images(13, 8, size=8))
    np.savez(tmp_path / "three.npz", arr_0=images(14, 3))
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(8))
    np.savez(tmp_path / "vector.npz", arr_0=np.arange(8.0))
    (tmp_path / "text.npz").write_text("not a zip")
    base = ["--features", "inception", "--inception", path, "--device", "cpu"]
    cases = [(tmp_path / "labels.npz", "expected an image array"), (tmp_path / "vector.npz", "expected images"),
             (tmp_path / "text.npz", "not a readable"), (tmp_path / "small.npz", "one image size"),
             (tmp_path / "three.npz", "at least 4")]
    for ref, message in cases:
        code, out, err = run_eval(capsys, "--gen", tmp_path / "gen.npz", "--ref", ref, *base)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (ref, err)
    code, _, err = run_eval(capsys, "--gen", tmp_path / "gen.npz", "--ref", tmp_path / "gen.npz", *base,
                            "--ref-stats", "stored")
    assert code == 2 and "stores no mu/sigma" in err
    code, _, err = run_eval(capsys, "--gen", tmp_path / "gen.npz", "--ref", tmp_path / "gen.npz",
                            "--features", "inception", "--device", "cpu")  # offline, nothing in the cache
    assert code == 2 and "offline" in err and len(err.strip().splitlines()) == 1


def test_no_eval_flag_is_taken_by_a_launcher():
    from torch.distributed.run import get_args_parser
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from speed_fast.cli import build_parser

    parser = build_parser(["eval"])
    sub = parser._subparsers._group_actions[0].choices["eval"]
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--") and s not in ("--help", "--n")]
    assert "--num-samples" in flags and "--ref-stats" in flags
    for flag in flags:
        ours = ["script.py", flag, "1"]
        torchrun = get_args_parser().parse_args(ours)
        assert torchrun.training_script == "script.py" and torchrun.training_script_args == [flag, "1"], flag
        ds = deepspeed_args(ours)
        assert ds.user_script == "script.py" and ds.user_args == [flag, "1"], flag
    # The one-process alias is what a launcher would take: --n is ambiguous to torchrun.
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["script.py", "--n", "1"])


def test_two_ranks_under_torchrun_give_the_one_rank_result(tiny, tmp_path, capsys):
    _, path = tiny
    np.savez(tmp_path / "gen.npz", arr_0=images(15, 13))
    np.savez(tmp_path / "ref.npz", arr_0=images(16, 11))
    args = ["--gen", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "--features", "inception",
            "--inception", path, "--device", "cpu", "--batch-size", "4", "--json", "--no-ref-cache"]
    code, out, err = run_eval(capsys, *args)
    assert code == 0, err
    one = json.loads(out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "speed_fast.cli", "eval", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 prints
