"""Sample and reference sets as float32 [N, C, H, W] (and labels): .npy / .npz files, a latent .beton,
or the embedded digits."""

from __future__ import annotations

import os

import numpy as np
import torch


ARRAY_KEYS = ("images", "latents", "samples", "x", "arr_0")


def load_array(path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data float32 [N, C, H, W], labels int64 [N] or None) from a .npy or .npz file.

    uint8 arrays are images in [0, 255] and are mapped to [-1, 1]; float arrays are taken as they
    are (images in [-1, 1] or latents). [N, H, W] gets a channel axis; [N, H, W, 1 or 3] (NHWC)
    is transposed. An .npz is read from the first of the keys images, latents, samples, x, arr_0
    it holds; labels from "labels" or "y" (or "arr_1" beside "arr_0") when present."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such array file: {path}")
    labels = None
    if path.endswith(".npz"):
        check_npz_headers(path)
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ARRAY_KEYS if k in z.files), None)
            if key is None:
                raise ValueError(f"{path} holds {z.files}; expected one of {ARRAY_KEYS}")
            arr = z[key]
            # ADM's sample batches (speed-fast sample --out X.npz): arr_0 images, arr_1 labels
            lab_key = next((k for k in ("labels", "y", "arr_1" if key == "arr_0" else "") if k in z.files), None)
            labels = torch.as_tensor(z[lab_key].astype(np.int64)) if lab_key else None
    elif path.endswith(".npy"):
        with open(path, "rb") as f:
            _check_header(f, os.path.getsize(path), path)
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # (N, ...) read as it is converted below
    else:
        raise ValueError(f"expected a .npy or .npz file, got {path}")
    if arr.ndim >= 1 and arr.shape[0] < 2:
        raise ValueError(f"{path} holds {arr.shape[0]} samples (shape {list(arr.shape)}); a Fréchet distance needs "
                         "at least 2")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{path}: expected [N, C, H, W] (or [N, H, W], [N, H, W, C]), got shape {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype == np.uint8:  # np.array: a writable copy out of the read-only memory map
        data = torch.from_numpy(np.array(arr, order="C")).float() / 127.5 - 1.0
    elif arr.dtype.kind == "f":
        data = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
    else:
        raise ValueError(f"{path}: expected uint8 images or float data, got dtype {arr.dtype}")
    if not torch.isfinite(data).all():
        raise ValueError(f"{path} has non-finite values")
    if labels is not None and labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} samples")
    return data, labels


def _check_header(f, size: int, name: str) -> None:
    """The .npy header at f's position against the `size` bytes that hold it: the data it declares
    must be exactly what follows, before anything is allocated for it."""
    try:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
    except ValueError as exc:
        raise ValueError(f"{name}: not a readable .npy header ({exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{name}: dtype {dtype} holds Python objects; expected numbers")
    header = f.tell()
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if header + declared != size:
        raise ValueError(f"{name}: the header declares shape {list(shape)} of {dtype} ({declared:,} bytes) but "
                         f"{size - header:,} bytes follow it (truncated or damaged)")


def check_npz_headers(path: str) -> None:
    """Every .npy member of an .npz checked against its uncompressed size in the zip directory."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.endswith(".npy"):
                with z.open(info) as f:
                    _check_header(f, info.file_size, f"{path}[{info.filename[:-4]}]")


def read_array(path: str, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`load_array` with unreadable files (empty, truncated, not an array) reported as a ValueError
    naming `what` (the flag) and the file."""
    import zipfile

    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes); expected a .npy or .npz array file")
    try:
        return load_array(path)  # headers checked against the file before anything is allocated
    except (EOFError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{what} {path!r} is not a readable .npy/.npz array ({type(exc).__name__}: {exc})") from None


def load_reference(spec: str, n_ref: int = 10000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data [N, C, H, W], labels or None) of a reference set: an array file, a latent .beton (a
    seeded random subset of at most n_ref samples, float32), or 'digits' (1797 images in [-1, 1])."""
    if spec == "digits":
        from ..data.digits import digits_arrays

        x, y = digits_arrays()
        return torch.from_numpy(x), torch.from_numpy(y)
    if spec.endswith(".beton"):
        from ..data import open_loader, read_latent_meta

        if n_ref < 2:
            raise ValueError(f"--n-ref must be >= 2, got {n_ref}")
        n = min(n_ref, read_latent_meta(spec)["num_samples"])
        x, y = next(iter(open_loader(spec, n, seed=0, num_workers=1, drop_last=True,
                                     out_dtype=torch.float32)))[:2]  # a captioned file's batches also hold text
        return x.clone(), y.clone()
    return read_array(spec, "--ref")
