"""Latents produced elsewhere, read for `speed-fast write-latents`: one .npy, one .npz, or fast-DiT's folders.

  ARRAYS.npy   latents [N, C, H, W] (memory-mapped, read in chunks); labels from --labels (.npy, [N])
  ARRAYS.npz   latents under "latents", "x" or "features"; labels under "labels" or "y" (or --labels);
               optional "class_names" (array of strings)
  DIR          fast-DiT's extract_features.py layout: DIR/<name>_features/<i>.npy holding (1, C, H, W)
               and DIR/<name>_labels/<i>.npy holding (1,), paired by file name (e.g. imagenet256_features
               and imagenet256_labels); plain DIR/features + DIR/labels also work. Files are ordered by
               their numeric stem (0, 1, 2, ..., 10), or by name when the stems are not all numbers.
With flip_copies, each latent is [2, C, H, W] (the image, then its mirrored image).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

LATENT_KEYS = ("latents", "x", "features")
LABEL_KEYS = ("labels", "y")


def load_array_file(path: str, what: str, **kwargs):
    """np.load(path, allow_pickle=False, **kwargs), with every way a file can fail to be an array
    (missing, empty, truncated, not .npy/.npz, pickled objects) turned into one ValueError naming
    `what` and the file. An .npz's members are read (and checked) when they are accessed."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes); expected a .npy or .npz array file")
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{what} {path!r} is not a readable .npy/.npz array ({type(exc).__name__}: {exc})") from None


def npz_member(z, key: str, path: str, what: str) -> np.ndarray:
    """z[key] of an open .npz, a damaged member named as a ValueError."""
    try:
        return z[key]
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{what} {path!r}: member {key!r} is unreadable ({type(exc).__name__}: {exc})") from None


def _load_labels(path: str) -> np.ndarray:
    if path.endswith(".npz"):
        with load_array_file(path, "--labels") as z:
            key = next((k for k in LABEL_KEYS if k in z.files), None)
            if key is None:
                raise ValueError(f"--labels {path!r} has keys {z.files}, expected one of {list(LABEL_KEYS)}")
            return np.asarray(npz_member(z, key, path, "--labels"))
    return np.asarray(load_array_file(path, "--labels"))


class NpyFolder:
    """fast-DiT's per-image .npy files as one [N, ...] array, read file by file when sliced."""

    def __init__(self, files: list[str], item_shape: tuple[int, ...]):
        self.files = files
        self.shape = (len(files),) + item_shape
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, sl: slice) -> np.ndarray:
        out = []
        for path in self.files[sl]:
            a = load_array_file(path, "feature file")
            a = a.reshape(a.shape[1:]) if a.ndim == len(self.shape) and a.shape[0] == 1 else a
            if a.shape != self.shape[1:]:
                raise ValueError(f"{path} holds shape {list(a.shape)}, expected {list(self.shape[1:])} "
                                 "(or with a leading 1) like the first feature file")
            out.append(a)
        return np.stack(out)


def _ordered_npy(directory: str) -> list[str]:
    names = [f for f in os.listdir(directory) if f.endswith(".npy")]
    stems = [f[:-4] for f in names]
    if all(s.isdigit() for s in stems):
        names = [f for _, f in sorted(zip((int(s) for s in stems), names))]
    else:
        names.sort()
    return names


def _fastdit_dirs(root: str) -> tuple[str, str]:
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    pairs = [(d, d[: -len("features")] + "labels") for d in subdirs if d.endswith("features")]
    pairs = [(f, l) for f, l in pairs if l in subdirs]
    if len(pairs) != 1:
        raise ValueError(f"{root!r} must hold exactly one pair of <name>_features/ and <name>_labels/ folders "
                         f"(fast-DiT's layout, e.g. imagenet256_features + imagenet256_labels); found "
                         f"{[f'{f} + {l}' for f, l in pairs] or subdirs}")
    return os.path.join(root, pairs[0][0]), os.path.join(root, pairs[0][1])


def load_fastdit_folder(root: str, progress: bool = False) -> tuple[NpyFolder, np.ndarray]:
    feat_dir, lab_dir = _fastdit_dirs(root)
    feats, labs = _ordered_npy(feat_dir), _ordered_npy(lab_dir)
    if not feats:
        raise ValueError(f"{feat_dir!r} holds no .npy feature files")
    if feats != labs:
        missing = sorted(set(feats) ^ set(labs))[:5]
        raise ValueError(f"{feat_dir!r} and {lab_dir!r} do not hold the same file names "
                         f"({len(feats)} vs {len(labs)} files; unmatched e.g. {missing})")
    first = load_array_file(os.path.join(feat_dir, feats[0]), "feature file")
    item = first.shape[1:] if first.ndim in (4, 5) and first.shape[0] == 1 else first.shape
    labels = np.empty(len(labs), dtype=np.int64)
    it = labs
    if progress:
        from tqdm import tqdm

        it = tqdm(labs, unit="label", desc="reading labels")
    for i, name in enumerate(it):
        y = load_array_file(os.path.join(lab_dir, name), "label file")
        if y.size != 1:
            raise ValueError(f"{os.path.join(lab_dir, name)} holds {y.size} values, expected one label")
        labels[i] = int(y.reshape(-1)[0])
    return NpyFolder([os.path.join(feat_dir, f) for f in feats], tuple(item)), labels


def load_latent_source(path: str, labels_path: str | None = None, progress: bool = False):
    """(latents array-like, labels int64 [N], class_names or None) from a .npy, a .npz or a fast-DiT folder."""
    class_names = None
    if os.path.isdir(path):
        if labels_path is not None:
            raise ValueError("--labels does not apply to a fast-DiT folder (its labels folder is used)")
        latents, labels = load_fastdit_folder(path, progress=progress)
        return latents, labels, None
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is neither a file nor a directory")
    if path.endswith(".npz"):
        with load_array_file(path, "latents") as z:
            key = next((k for k in LATENT_KEYS if k in z.files), None)
            if key is None:
                raise ValueError(f"{path!r} has keys {z.files}; expected latents under one of {list(LATENT_KEYS)}")
            latents = npz_member(z, key, path, "latents")
            lkey = next((k for k in LABEL_KEYS if k in z.files), None)
            if labels_path is not None:
                labels = _load_labels(labels_path)
            elif lkey is not None:
                labels = npz_member(z, lkey, path, "latents")
            else:
                raise ValueError(f"{path!r} has keys {z.files} but no labels (one of {list(LABEL_KEYS)}); "
                                 "pass --labels FILE.npy")
            if "class_names" in z.files:
                class_names = [str(c) for c in npz_member(z, "class_names", path, "latents")]
        return latents, labels, class_names
    if path.endswith(".npy"):
        if labels_path is None:
            raise ValueError(f"{path!r} holds only latents; pass their labels with --labels FILE.npy")
        latents = load_array_file(path, "latents", mmap_mode="r")
        return latents, _load_labels(labels_path), None
    raise ValueError(f"{path!r}: expected a .npy file, a .npz file or a fast-DiT features folder")
