"""CLIP score: how well generated images match the prompts they were drawn from (text-to-image).

    clip = load_clip("openai/clip-vit-large-patch14", device)      # or a save_pretrained CLIPModel directory
    result = clip_score(open_images("samples.npz", "--gen"), prompts, clip, job)
    # {"clip_score": 31.2, "clip_score_std": 3.9, "n_generated": 30000, "clip_model": ..., "clip_truncated": 0, ...}

Definition (torchmetrics' CLIPScore as its documentation states it, the form text-to-image papers
report; Hessel et al. 2021 with w = 100): for each image i and its prompt c_i,
    s_i = 100 * max(cos(E_I(i), E_T(c_i)), 0)
with E_I, E_T CLIPModel's projected image and text embeddings (`get_image_features`,
`get_text_features`), and `clip_score` the mean of s_i over the set, `clip_score_std` their
standard deviation (ddof = 0; the standard error of the mean is std / sqrt(N)). torchmetrics'
code clamps the mean of the unclamped pair scores instead; the two agree whenever no pair's cosine
is negative, which is the usual case for a trained CLIP (matching pairs' cosines are typically 0.1-0.4).

Inputs, as CLIPImageProcessor and CLIPTokenizer prepare them for the model:
* images (uint8 [B, C, H, W], as `open_images` batches ADM's arr_0 [N, H, W, 3]; 1 channel is
  repeated to 3 as the processor's RGB conversion does): the shortest side resized to the model's
  size with bicubic filtering (H' = int(S * H / W) for the longer side), center crop
  (top = (H' - h) // 2), / 255, (x - mean) / std. The resize is done in torch, without torchvision,
  the way PIL (the processor's own backend) does it: separable antialiased bicubic (a = -0.5),
  horizontal pass first, each pass rounded to uint8; it matches PIL to within one grey level, on
  at most about 0.1% of values (PIL rounds in fixed point; tests/test_clip_score.py). The
  sizes, mean and std come from the model's preprocessor_config.json when it has one (a different
  filter or recipe is refused), else the vision tower's image_size and OpenAI's CLIP mean/std.
* prompts: the CLIP tokenizer, padded to the batch's longest, truncated at L =
  min(tokenizer.model_max_length, text max_position_embeddings) tokens (77 for OpenAI's CLIPs)
  keeping the end-of-text token, as openai/CLIP's `clip.tokenize(truncate=True)` does
  (torchmetrics slices the ids instead, which drops it); the result counts the truncated prompts.

The model (`load_clip`): a hub id (through huggingface_hub into its cache, HF_HUB_OFFLINE=1 for the
cache only; `speed_fast.text.resolve_text_encoder`'s rules) or a local save_pretrained directory
holding a CLIPModel (text and vision towers) and its tokenizer; anything else (a name that cannot
be had, a text-only CLIPTextModel, another model type) is one line (ValueError). Computed in
float32 (TF32 off on GPUs), without gradients, in batches. A tiny random CLIP
(tests/test_clip_score.py) gives numbers with no meaning: it checks the arithmetic only.

Sharding: as ADM's metrics (`speed_fast.evaluation.suite`), each rank scores its contiguous share
of the pairs and the scores are gathered in file order; every rank gets the same result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..jsonfile import JSONFileError, read_json_object
from ..text import quiet_transformers, resolve_text_encoder
from .inception import ieee_fp32
from .suite import LocalJob, share

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` of CLIP's preprocessor_config.json
_EXPECTED = ("a local directory saved with save_pretrained holding a CLIPModel (text and vision towers) and its "
             "CLIPTokenizer, or a hub id such as openai/clip-vit-large-patch14")


def _pil_resize_pass(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One axis of PIL's bicubic resize on integer-valued float [B, C, H, W]: antialiased (torch's
    antialias kernel is PIL's), rounded and clipped to uint8 values as PIL stores each pass."""
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).round_().clamp_(0, 255)


def clip_pixels(images: torch.Tensor, size: int, crop: tuple[int, int], mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor:
    """CLIP's pixel_values (float32 [B, 3, crop_h, crop_w], on the images' device) of uint8 images
    [B, C, H, W], C = 1 or 3: the shortest side resized to `size` (module docstring), center crop, /255, mean/std."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"CLIP score needs uint8 images [B, 1 or 3, H, W], got {images.dtype} "
                         f"{list(images.shape)}")
    x = images.float().expand(-1, 3, -1, -1)  # (B, 3, H, W); one channel repeated, as convert_rgb does
    h, w = x.shape[-2:]
    new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    if new_w != w:  # PIL resamples the horizontal axis first
        x = _pil_resize_pass(x, (h, new_w))
    if new_h != h:
        x = _pil_resize_pass(x, (new_h, new_w))
    top, left = (new_h - crop[0]) // 2, (new_w - crop[1]) // 2
    x = x[:, :, top:top + crop[0], left:left + crop[1]]  # (B, 3, crop_h, crop_w)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return ((x / 255.0 - m) / s).contiguous()


def _side(value, key: str) -> int | None:
    """A size entry of preprocessor_config.json: an int, or a dict's `key`."""
    if isinstance(value, dict):
        value = value.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _preprocessing(local: str, image_size: int, what: str) -> dict:
    """{"size", "crop", "mean", "std"}: the CLIP recipe's numbers from preprocessor_config.json,
    else the vision tower's image_size and OpenAI's mean/std; ValueError when the file asks for another recipe."""
    path = os.path.join(local, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {"size": image_size, "crop": (image_size, image_size), "mean": OPENAI_CLIP_MEAN,
                "std": OPENAI_CLIP_STD}
    try:
        cfg = read_json_object(path)
    except JSONFileError as exc:
        raise ValueError(f"{what}: {exc}") from None
    recipe = ("CLIP's preprocessing (bicubic resize of the shortest side, center crop, rescale 1/255, mean/std "
              "normalisation)")
    size = cfg.get("size", image_size)
    if isinstance(size, dict) and set(size) != {"shortest_edge"}:
        raise ValueError(f"{what}: preprocessor_config.json resizes to {size}; this CLIP score implements {recipe}, "
                         "whose size is {'shortest_edge': S}")
    unsupported = [f"{k}={cfg[k]!r}" for k, want in (("resample", PIL_BICUBIC), ("do_resize", True),
                                                    ("do_center_crop", True), ("do_rescale", True),
                                                    ("do_normalize", True)) if k in cfg and cfg[k] != want]
    factor = cfg.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or not np.isclose(factor, 1 / 255):
        unsupported.append(f"rescale_factor={factor!r}")
    if unsupported:
        raise ValueError(f"{what}: preprocessor_config.json has {', '.join(unsupported)}; this CLIP score "
                         f"implements {recipe} only")
    side = _side(size, "shortest_edge")
    crop_cfg = cfg.get("crop_size", side)
    crop = (_side(crop_cfg, "height"), _side(crop_cfg, "width"))
    mean, std = cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD)
    if side is None or None in crop:
        raise ValueError(f"{what}: preprocessor_config.json has size {size!r} and crop_size {crop_cfg!r}; expected "
                         "positive integers (or {'shortest_edge': S} and {'height': h, 'width': w})")
    if crop[0] > side or crop[1] > side:
        raise ValueError(f"{what}: preprocessor_config.json crops {crop[0]}x{crop[1]} out of a shortest side of "
                         f"{side}; expected a crop no larger than the resized image")
    if crop != (image_size, image_size):
        raise ValueError(f"{what}: preprocessor_config.json crops {crop[0]}x{crop[1]} but the vision tower takes "
                         f"{image_size}x{image_size} images")
    for key, v in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(e, (int, float)) for e in v)
                and (key == "image_mean" or all(e > 0 for e in v))):
            raise ValueError(f"{what}: preprocessor_config.json {key} is {v!r}; expected 3 numbers (std > 0)")
    return {"size": side, "crop": crop, "mean": tuple(float(e) for e in mean), "std": tuple(float(e) for e in std)}


@dataclass
class ClipModel:
    """A CLIPModel, its tokenizer and its image preprocessing: `pair_scores(images, prompts)`."""

    name: str
    model: object
    tokenizer: object
    device: torch.device
    size: int  # the shortest side after resizing
    crop: tuple[int, int]  # (h, w) of the center crop: the vision tower's input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_tokens: int  # L: prompts are truncated to this many tokens
    record: dict  # name, source, path, revision

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(100 * cos float64 [B], unclamped; truncated bool [B]) of uint8 images [B, C, H, W] and
        their B prompts."""
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images; expected one prompt per image")
        with quiet_transformers():
            full = self.tokenizer(prompts, padding=False, truncation=False)["input_ids"]
            text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                                  return_tensors="pt")
        truncated = np.array([len(ids) > self.max_tokens for ids in full], dtype=bool)
        pixels = clip_pixels(images.to(self.device), self.size, self.crop, self.mean, self.std)  # (B, 3, h, w)
        with ieee_fp32():
            img = self.model.get_image_features(pixel_values=pixels).pooler_output  # (B, P)
            txt = self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                               attention_mask=text["attention_mask"].to(self.device)).pooler_output
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1, eps=1e-12)  # (B,)
        return 100.0 * cos.double().cpu().numpy(), truncated


def load_clip(name: str, device="cpu", flag: str = "--clip-model") -> ClipModel:
    """The CLIPModel `name` (a hub id or a save_pretrained directory; module docstring) in eval mode,
    float32, on `device`; ValueError (one line) when it is not one."""
    where = resolve_text_encoder(name, flag, expected=_EXPECTED)
    what = f"{flag} {name!r}"
    try:
        config = read_json_object(os.path.join(where["local"], "config.json"))
    except JSONFileError as exc:
        raise ValueError(f"{what}: {exc}; expected {_EXPECTED}") from None
    kind = config.get("model_type")
    if kind != "clip":
        hint = " (a text-only CLIP: its vision tower is missing)" if kind == "clip_text_model" else ""
        raise ValueError(f"{what}: config model_type {kind!r}{hint}; CLIP score needs a CLIPModel (model_type "
                         "'clip', text and vision towers) and its tokenizer")
    from transformers import CLIPModel, CLIPTokenizer

    try:
        with quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(where["local"], local_files_only=True)
            model = CLIPModel.from_pretrained(where["local"], local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{what}: could not load a CLIPModel and its tokenizer from {where['local']} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); expected {_EXPECTED}") from None
    pre = _preprocessing(where["local"], int(model.config.vision_config.image_size), what)
    max_tokens = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    device = torch.device(device)
    return ClipModel(name=name, model=model.to(device).eval(), tokenizer=tokenizer, device=device,
                     max_tokens=max_tokens, record={k: where[k] for k in ("name", "source", "path", "revision")},
                     **pre)


def clip_score(images, prompts: Sequence[str], clip: ClipModel, job=None, batch_size: int = 64) -> dict:
    """The CLIP score of an image set (`open_images` / `TensorImages`) against its prompts, one per
    image in order (module docstring); the same dict on every rank of `job`."""
    job = job or LocalJob()
    prompts = list(prompts)
    if len(prompts) != images.n:
        raise ValueError(f"{len(prompts)} prompts for {images.n} images; expected one prompt per image, in order")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rows = share(images.n, job.rank, job.world)
    scores, truncated = [np.zeros(0)], [np.zeros(0, dtype=bool)]
    start = rows.start
    for batch in images.batches(rows, batch_size):
        s, t = clip.pair_scores(batch, prompts[start:start + batch.shape[0]])
        scores.append(s)
        truncated.append(t)
        start += batch.shape[0]
    parts = job.all_gather((np.concatenate(scores), np.concatenate(truncated)))
    pair = np.maximum(np.concatenate([p[0] for p in parts]), 0.0)  # (N,) in file order
    return {"clip_score": float(pair.mean()), "clip_score_std": float(pair.std()), "n_generated": int(pair.size),
            "clip_model": clip.name, "clip_truncated": int(sum(int(p[1].sum()) for p in parts)),
            "clip_max_tokens": clip.max_tokens}
