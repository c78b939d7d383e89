"""Reference-set features kept between `speed-fast eval` runs, by content hash.

A reference batch (ADM's VIRTUAL_imagenet256_labeled.npz: 10,000 images) costs minutes of
Inception passes and is the same every time. Its pool features (float32 [N, 2048]: precision and
recall need them, not only their mean and covariance) and its spatial statistics (mu_s, sigma_s)
are stored in `speed_fast.paths.reference_cache_dir()/<key>.npz`, key = SHA-256 over the
reference file's bytes, the network file's SHA-256 and `FEATURES_VERSION` (bumped whenever the
way features are computed changes). A renamed or copied reference hits; an edited one, another
network or another feature code misses. Files are written under a temporary name and renamed
(`speed_fast.atomic.temporary_name`), so a reader never sees half of one; a damaged entry reads
as a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from .. import paths
from ..atomic import temporary_name
from .download import sha256_of

FEATURES_VERSION = 1


def reference_key(path, network_sha256: str) -> str:
    h = hashlib.sha256()
    h.update(f"speed_fast eval reference features v{FEATURES_VERSION}\n".encode())
    h.update(f"network {network_sha256}\nfile {sha256_of(path)}\n".encode())
    return h.hexdigest()


def cache_path(key: str) -> str:
    return os.path.join(paths.reference_cache_dir(), f"{key}.npz")


def load(key: str) -> dict | None:
    """{"pool", and "mu_s", "sigma_s" when spatial features were available} or None on a miss."""
    path = cache_path(key)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if "pool" not in out or out["pool"].ndim != 2:
        return None
    return out


def save(key: str, pool: np.ndarray, spatial_stats: tuple | None) -> str:
    path = cache_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temporary_name(path) + ".npz"  # np.savez appends .npz to names without it
    arrays = {"pool": np.asarray(pool, np.float32)}
    if spatial_stats is not None:
        arrays["mu_s"], arrays["sigma_s"] = spatial_stats
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
