"""The embedded default dataset: scikit-learn's 8x8 digits as 1x8x8 "latents", through the same writer and loader.

1797 images, 10 classes, pixel values 0..16 mapped to [-1, 1] (x / 8 - 1), stored as bf16 like
real VAE latents. It ships with scikit-learn, so `deepspeed train/main.py` runs with no download.

The captioned digits (`write_captioned_digits`, benchmarks/make_captioned_digits.py) are the same
records with a caption each, one of DIGIT_PHRASINGS for its digit drawn by a seeded generator, and
the captions' embeddings by a tiny CLIP text model built from the same seed (speed_fast.text): the
text-to-image set of the CPU verdict. `ensure_captioned_digits()` writes them once (seed 0, width 32)
into the cache, for `--data digits-t2i`.
"""

from __future__ import annotations

import fcntl
import os

import numpy as np

from ..paths import cache_dir as default_cache_dir
from .latents import LatentFileError, read_latent_meta, write_latents

DIGITS_SOURCE = "sklearn.datasets.load_digits"
DIGITS_SAMPLES = 1797
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit's word, {n}: its numeral. Every word is one of speed_fast.text.TINY_WORDS.
DIGIT_PHRASINGS = ("a handwritten {w}", "the digit {n}", "number {w}, drawn by hand", "a picture of the number {n}",
                   "{w}", "a small black and white {w}")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(latents float32 [1797, 1, 8, 8] in [-1, 1], labels int64 [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (1797, 1, 8, 8)
    return x, d.target.astype(np.int64)


def _is_current(path: str) -> bool:
    try:
        meta = read_latent_meta(path)
    except LatentFileError:
        return False
    return (meta.get("source", {}).get("dataset") == DIGITS_SOURCE and meta["num_samples"] == DIGITS_SAMPLES
            and meta["shape"] == [1, 8, 8] and meta["store_dtype"] == "bfloat16" and not meta["flip_copies"])


def ensure_digits_beton(path: str | os.PathLike | None = None) -> str:
    """Path of the digits .beton (default `<cache>/digits.beton`, speed_fast.paths), written first if
    missing or invalid. A file lock next to it keeps concurrent ranks from writing it twice."""
    path = os.fspath(path) if path is not None else os.path.join(default_cache_dir(), "digits.beton")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "digits.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_current(path):
                x, y = digits_arrays()
                write_latents(path, x, y, class_names=[str(i) for i in range(10)], store_dtype="bfloat16",
                              extra={"dataset": DIGITS_SOURCE, "scaling": "x / 8 - 1"})
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def digit_captions(labels: np.ndarray, seed: int = 0) -> list[str]:
    """One caption per label: a phrasing drawn per image from SeedSequence([seed, 20]) (the same seed, the same captions)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 20])))
    pick = rng.integers(0, len(DIGIT_PHRASINGS), size=len(labels))
    return [DIGIT_PHRASINGS[k].format(w=DIGIT_WORDS[y], n=int(y)) for k, y in zip(pick, labels)]


def _captioned_is_current(path: str) -> bool:
    try:
        meta = read_latent_meta(path)
    except LatentFileError:
        return False
    text = meta.get("text") or {}
    return (meta.get("source", {}).get("dataset") == DIGITS_SOURCE and meta["num_samples"] == DIGITS_SAMPLES
            and text.get("width") == 32 and os.path.isfile(os.path.join(str(text.get("encoder")), "config.json")))


def ensure_captioned_digits(out_dir: str | os.PathLike | None = None) -> str:
    """Path of the captioned digits .beton of seed 0 and width 32 (default under `<cache>/digits-t2i/`, with
    its tiny CLIP in clip/), written first by `write_captioned_digits` if missing or invalid (about 20 s
    on 2 cores). A file lock keeps concurrent ranks from writing it twice."""
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(default_cache_dir(), "digits-t2i")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), "digits-captions.beton")
    with open(os.path.join(out_dir, "digits-t2i.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _captioned_is_current(path):
                write_captioned_digits(out_dir, seed=0, width=32)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def write_captioned_digits(out_dir: str | os.PathLike, seed: int = 0, width: int = 32, limit: int | None = None) -> dict:
    """Write the captioned digits into `out_dir`: clip/ (the tiny CLIP text model of `seed`, `width`),
    captions.jsonl ({"index", "label", "caption"} per image), prompts.txt (each digit's phrasings, one
    a line, for sampling) and digits-captions.beton (+ .json): the digits' records (labels = digits,
    class names "0".."9") with their captions' embeddings. `limit`: the first N images only (tests).
    Deterministic: the same arguments write the same bytes (the sidecar names out_dir's paths).
    Returns the .beton's sidecar dict."""
    import json

    import torch

    from ..text import build_tiny_clip, load_text_encoder

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    x, y = digits_arrays()
    if limit is not None:
        x, y = x[:limit], y[:limit]
    captions = digit_captions(y, seed)
    clip = build_tiny_clip(os.path.join(out_dir, "clip"), seed=seed, width=width)
    encoder = load_text_encoder(clip)
    distinct = sorted(set(captions))  # 60 phrasings: each embedded once, alone, so no batch changes its bits
    rows = [encoder.encode([c]) for c in distinct]
    tokens = torch.cat([r[0] for r in rows])  # (K, L, D)
    pooled = torch.cat([r[1] for r in rows])  # (K, D)
    at = {c: i for i, c in enumerate(distinct)}
    which = torch.tensor([at[c] for c in captions])
    null_tokens, null_pooled, _ = encoder.encode([""])
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
        for i, (label, caption) in enumerate(zip(y, captions)):
            f.write(json.dumps({"index": i, "label": int(label), "caption": caption}) + "\n")
    with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
        for d in range(10):
            for phrasing in DIGIT_PHRASINGS:
                f.write(phrasing.format(w=DIGIT_WORDS[d], n=d) + "\n")
    return write_latents(os.path.join(out_dir, "digits-captions.beton"), x, y, class_names=[str(i) for i in range(10)],
                         store_dtype="bfloat16", text=tokens[which], pooled=pooled[which],
                         text_meta={"encoder": clip, "seed": seed, "truncated": 0,
                                    "null": {"tokens": null_tokens[0], "pooled": null_pooled[0]}},
                         extra={"dataset": DIGITS_SOURCE, "scaling": "x / 8 - 1", "captions": "captions.jsonl",
                                "caption_seed": seed, "phrasings": list(DIGIT_PHRASINGS)})
