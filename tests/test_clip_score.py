"""CLIP score (`speed_fast.evaluation.clip_score`, `speed-fast eval --clip-model`) against an
independent computation written here: images prepared by transformers' PIL CLIPImageProcessor
(not the torch resize under test), each prompt tokenised alone and truncated the way openai/CLIP's
`clip.tokenize(truncate=True)` does, cosines in float64 numpy, the clamp at 0 per pair.

The CLIP is a tiny CLIPModel with random weights from a fixed seed (text tower and tokenizer of
speed_fast.text.build_tiny_clip, a 30-pixel vision tower), saved with a preprocessor_config.json
whose mean/std are not OpenAI's, so reading it is checked. Its scores mean nothing; its cosines
spread over both signs (seed 4: about half of them below 0), which is what the clamp test needs."""

import shutil

import numpy as np
import pytest
import torch

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
