"""The embedded default dataset: scikit-learn's 8x8 digits as 1x8x8 "latents", through the same writer and loader.

1797 images, 10 classes, pixel values 0..16 mapped to [-1, 1] (x / 8 - 1), stored as bf16 like
real VAE latents. It ships with scikit-learn, so `deepspeed train/main.py` runs with no download.
"""

from __future__ import annotations

import fcntl
import os

import numpy as np

from ..paths import cache_dir as default_cache_dir
from .latents import LatentFileError, read_latent_meta, write_latents

DIGITS_SOURCE = "sklearn.datasets.load_digits"
DIGITS_SAMPLES = 1797


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
