"""CLIP score (`speed_fast.evaluation.clip_score`, `speed-fast eval --clip-model`) against an
independent computation written here: images prepared by transformers' PIL CLIPImageProcessor
(not the torch resize under test), each prompt tokenised alone and truncated the way openai/CLIP's
`clip.tokenize(truncate=True)` does, cosines in float64 numpy, the clamp at 0 per pair; the CLI end
to end (prompts from the .npz and from --prompts FILE, beside --ref), two ranks under torchrun, and
every bad input as one line with exit 2.

The CLIP is a tiny CLIPModel with random weights from a fixed seed (text tower and tokenizer of
speed_fast.text.build_tiny_clip, a 30-pixel vision tower), saved with a preprocessor_config.json
whose mean/std are not OpenAI's, so reading it is checked. Its scores mean nothing; its cosines
spread over both signs (seed 4: about half of them below 0), which is what the clamp test needs."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from speed_fast.cli import main as cli_main
from speed_fast.evaluation import TensorImages, clip_pixels, clip_score, load_clip
from speed_fast.evaluation.clip_score import OPENAI_CLIP_MEAN
from speed_fast.text import build_tiny_clip

SIZE = 30  # the vision tower's input (and the preprocessor's shortest edge and crop)
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
PROMPTS = ["a red cat", "the digit seven", "a small black dog", "handwritten zero", "a photo of a blue cat",
           "nine", "a big green dog on a white image"]
LONG = "a red cat " * 40  # 121 tokens with the tiny tokenizer: truncated at 77


def build_clip(directory, seed=0):
    """A tiny CLIPModel + tokenizer + preprocessor config saved in `directory`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    text = build_tiny_clip(directory / "text-only", seed=seed, width=16)
    cfg = CLIPConfig(text_config=CLIPTextConfig.from_pretrained(text).to_dict(), projection_dim=12,
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=SIZE, patch_size=6))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    out = directory / "clip"
    model.save_pretrained(out)
    CLIPTokenizer.from_pretrained(text).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                          image_mean=MEAN, image_std=STD).save_pretrained(out)
    return str(out), text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("clip"), seed=4)  # a seed whose cosines fall about half below 0


def smooth_images(n, h, w, seed):
    """uint8 [n, h, w, 3]: smooth colour fields plus noise, so resizing matters and clips at 0 and 255 happen."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(-40, 300, size=(n, 3, h // 4 + 2, w // 4 + 2)).astype(np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").numpy()
    x = x + rng.normal(scale=25, size=x.shape)
    return np.clip(x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def pil_pixels(directory, images_nhwc):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(directory)(images=list(images_nhwc), return_tensors="pt")[
        "pixel_values"]


def reference_cosines(directory, images_nhwc, prompts):
    """cos(E_I, E_T) float64 [N] of each image and its prompt, computed independently (module docstring)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(directory).eval()
    tok = CLIPTokenizer.from_pretrained(directory)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pil_pixels(directory, images_nhwc)).pooler_output.double()
        txt = []
        for p in prompts:
            ids = tok(p)["input_ids"]
            if len(ids) > 77:
                ids = ids[:76] + [tok.eos_token_id]  # openai/CLIP: keep 77 tokens, the last one the end token
            txt.append(model.get_text_features(input_ids=torch.tensor([ids])).pooler_output[0].double())
    img, txt = img.numpy(), torch.stack(txt).numpy()
    return (img * txt).sum(1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))


def to_nchw(images_nhwc):
    return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def run_eval(capsys, *args):
    code = cli_main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("h, w", [(37, 53), (11, 17), (64, 45), (30, 41)])
def test_pixels_match_the_pil_clip_image_processor(tiny, h, w):
    """Down- and up-sizing, both orientations, and a crop-only size: within one grey level of PIL's
    uint8 resize, on at most 0.5% of values (measured: 0 to 0.1%; PIL rounds in 22-bit fixed
    point, torch in float32, so exact halves can round apart)."""
    path, _ = tiny
    x = smooth_images(4, h, w, seed=h * w)
    got = clip_pixels(to_nchw(x), SIZE, (SIZE, SIZE), MEAN, STD)
    want = pil_pixels(path, x)
    assert got.shape == want.shape == (4, 3, SIZE, SIZE) and got.dtype == torch.float32
    levels = ((got - want) * torch.tensor(STD)[:, None, None] * 255).abs()  # difference in grey levels
    assert levels.max() <= 1 + 1e-3
    assert (levels > 0.5).float().mean() <= 5e-3
    if (h, w) == (30, 41):  # no resize: crop and normalisation alone are exact to float32 rounding
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    gray = clip_pixels(to_nchw(x[..., :1]), SIZE, (SIZE, SIZE), MEAN, STD)
    assert torch.equal(gray, clip_pixels(to_nchw(x[..., :1].repeat(3, -1)), SIZE, (SIZE, SIZE), MEAN, STD))


def test_score_against_an_independent_computation_and_the_clamp(tiny):
    """The mean over pairs of 100 * max(cos, 0), clamped per pair. Tolerance: 1e-3 points per pair
    without a resize (float32 forwards in batches of different sizes, ~1e-6 relative, times 100);
    0.05 points per pair with one (the pixels above differ by one grey level on about 0.1% of values;
    measured: up to 0.014 points, for 16x16 images upsized to 30)."""
    path, _ = tiny
    clip = load_clip(path)
    assert (clip.size, clip.crop, clip.mean, clip.std, clip.max_tokens) == (SIZE, (SIZE, SIZE), tuple(MEAN),
                                                                           tuple(STD), 77)
    prompts = PROMPTS + [LONG]
    for (h, w), tol in (((30, 41), 1e-3), ((37, 53), 5e-2)):
        x = smooth_images(len(prompts), h, w, seed=h + w)
        cos = reference_cosines(path, x, prompts)
        assert (cos < 0).any() and (cos > 0).any()  # the clamp below decides the result
        pairs, truncated = clip.pair_scores(to_nchw(x), prompts)
        np.testing.assert_allclose(pairs, 100 * cos, rtol=0, atol=tol)
        assert truncated.tolist() == [False] * len(PROMPTS) + [True]
        result = clip_score(TensorImages(to_nchw(x), "x"), prompts, clip, batch_size=3)
        clamped = 100 * np.maximum(cos, 0)
        assert result["clip_score"] == pytest.approx(clamped.mean(), abs=tol)
        assert result["clip_score_std"] == pytest.approx(clamped.std(), abs=tol)
        assert abs(result["clip_score"] - 100 * cos.mean()) > 10 * tol  # not the clamp of the mean
        assert (result["n_generated"], result["clip_truncated"], result["clip_max_tokens"]) == (len(prompts), 1, 77)


def test_without_a_preprocessor_config_the_vision_size_and_openai_statistics_are_used(tiny, tmp_path):
    path, _ = tiny
    shutil.copytree(path, tmp_path / "bare", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    clip = load_clip(str(tmp_path / "bare"))
    assert (clip.size, clip.crop, clip.mean) == (SIZE, (SIZE, SIZE), OPENAI_CLIP_MEAN)


def save_gen(path, x, prompts=None, **extra):
    arrays = {"arr_0": x, "arr_1": np.arange(len(x))}
    if prompts is not None:
        arrays["prompts"] = np.array(prompts)
    np.savez(path, **arrays, **extra)


def test_cli_prompts_from_the_npz_or_a_file_alone_or_beside_ref(tiny, tmp_path, capsys):
    path, _ = tiny
    x = smooth_images(len(PROMPTS), 16, 16, seed=5)  # upsized to 30
    save_gen(tmp_path / "gen.npz", x, PROMPTS)
    assert np.load(tmp_path / "gen.npz", allow_pickle=False)["prompts"].dtype.kind == "U"
    want = 100 * np.maximum(reference_cosines(path, x, PROMPTS), 0)
    code, out, err = run_eval(capsys, "--gen", tmp_path / "gen.npz", "--clip-model", path, "--device", "cpu",
                              "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["clip_score"] == pytest.approx(want.mean(), abs=0.05)
    assert result["clip_score_std"] == pytest.approx(want.std(), abs=0.05)
    assert (result["clip_model"], result["n_generated"], result["clip_truncated"]) == (path, len(PROMPTS), 0)
    assert "fid" not in result and "fd_raw" not in result
    # --prompts FILE for an npz without prompts (CRLF line ends; the file wins over the npz's prompts below)
    save_gen(tmp_path / "bare.npz", x)
    (tmp_path / "prompts.txt").write_bytes("\r\n".join(PROMPTS).encode() + b"\r\n")
    code, out, err = run_eval(capsys, "--gen", tmp_path / "bare.npz", "--prompts", tmp_path / "prompts.txt",
                              "--clip-model", path, "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["clip_score"] == pytest.approx(result["clip_score"], abs=1e-9)
    save_gen(tmp_path / "other.npz", x, PROMPTS[::-1])
    code, out, err = run_eval(capsys, "--gen", tmp_path / "other.npz", "--prompts", tmp_path / "prompts.txt",
                              "--clip-model", path, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["clip_score"] == pytest.approx(result["clip_score"], abs=1e-9)
    # beside the reference metrics, in the JSON and in the table
    args = ["--gen", tmp_path / "gen.npz", "--ref", tmp_path / "bare.npz", "--clip-model", path, "--device", "cpu"]
    code, out, err = run_eval(capsys, *args, "--json")
    assert code == 0, err
    both = json.loads(out)
    assert both["fd_raw"] == pytest.approx(0, abs=1e-6) and both["clip_score"] == pytest.approx(result["clip_score"])
    code, out, err = run_eval(capsys, *args)
    assert code == 0, err
    assert "FD (raw)" in out and re.search(rf"^CLIP score +{result['clip_score']:.6g}$", out, re.M)
    assert re.search(rf"^CLIP score std +{result['clip_score_std']:.6g}$", out, re.M)
    assert "0 prompts truncated at 77 tokens" in out


def test_two_ranks_under_torchrun_give_the_one_rank_result(tiny, tmp_path, capsys):
    path, _ = tiny
    save_gen(tmp_path / "gen.npz", smooth_images(len(PROMPTS), 20, 24, seed=6), PROMPTS)
    args = ["eval", "--gen", tmp_path / "gen.npz", "--clip-model", path, "--device", "cpu", "--batch-size", "2",
            "--json"]
    code, out, err = run_eval(capsys, *args[1:])
    assert code == 0, err
    one = json.loads(out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "speed_fast.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints
    two = json.loads(lines[0])
    assert two["clip_score"] == pytest.approx(one["clip_score"], abs=1e-4)
    assert two["clip_score_std"] == pytest.approx(one["clip_score_std"], abs=1e-4)
    assert two["n_generated"] == one["n_generated"] == len(PROMPTS)


def test_bad_inputs_are_one_line_and_exit_2(tiny, tmp_path, capsys, monkeypatch):
    path, text_only = tiny
    n = len(PROMPTS)
    x = smooth_images(n, 8, 8, seed=7)
    save_gen(tmp_path / "gen.npz", x, PROMPTS)
    save_gen(tmp_path / "bare.npz", x)
    save_gen(tmp_path / "short.npz", x, PROMPTS[:-1])
    np.savez(tmp_path / "ints.npz", arr_0=x, prompts=np.arange(n))
    np.save(tmp_path / "gen.npy", x)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    bilinear = tmp_path / "bilinear"
    shutil.copytree(path, bilinear)
    cfg = json.loads((bilinear / "preprocessor_config.json").read_text())
    (bilinear / "preprocessor_config.json").write_text(json.dumps({**cfg, "resample": 2}))
    smaller = tmp_path / "smaller"
    shutil.copytree(path, smaller)
    (smaller / "preprocessor_config.json").write_text(json.dumps({**cfg, "size": {"shortest_edge": 24},
                                                                  "crop_size": {"height": 24, "width": 24}}))
    (tmp_path / "run").mkdir()
    clip = ["--clip-model", path, "--device", "cpu"]
    cases = [
        (["--gen", tmp_path / "bare.npz", *clip], "holds no prompts (no 'prompts' array"),
        (["--gen", tmp_path / "gen.npy", *clip], "holds no prompts"),
        (["--gen", tmp_path / "short.npz", *clip], f"holds {n - 1} prompts for {n} images"),
        (["--gen", tmp_path / "ints.npz", *clip], "expected a unicode array"),
        (["--gen", tmp_path / "bare.npz", "--prompts", tmp_path / "empty.txt", *clip], "is empty"),
        (["--gen", tmp_path / "bare.npz", "--prompts", tmp_path / "three.txt", *clip],
         f"holds 3 prompts but --gen holds {n} images"),
        (["--gen", tmp_path / "bare.npz", "--prompts", tmp_path / "nowhere.txt", *clip], "is not a file"),
        (["--gen", tmp_path / "gen.npz", "--clip-model", text_only, "--device", "cpu"],
         "model_type 'clip_text_model' (a text-only CLIP"),
        (["--gen", tmp_path / "gen.npz", "--clip-model", "./nowhere", "--device", "cpu"],
         "--clip-model './nowhere': no such directory"),
        (["--gen", tmp_path / "gen.npz", "--clip-model", bilinear, "--device", "cpu"], "resample=2"),
        (["--gen", tmp_path / "gen.npz", "--clip-model", smaller, "--device", "cpu"],
         "crops 24x24 but the vision tower takes 30x30"),
        (["--gen", tmp_path / "run", *clip], "is a directory but not a run directory ("),
        (["--gen", tmp_path / "gen.npz"], "eval needs --ref REF"),
        (["--gen", tmp_path / "gen.npz", "--prompts", tmp_path / "three.txt", "--ref", "digits"],
         "give --clip-model NAME too"),
    ]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    cases.append((["--gen", tmp_path / "gen.npz", "--clip-model", "nobody/no-such-clip"],
                  "HF_HUB_OFFLINE=1 forbids downloading it"))
    for args, message in cases:
        code, out, err = run_eval(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out, (args, err)
