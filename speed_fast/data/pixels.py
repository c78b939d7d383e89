"""Images -> a pixel-space .beton (no VAE): `speed-fast write-pixels` lives here.

For small-image datasets trained directly on pixels (CIFAR-10 at 32x32, the digits default):

  SOURCE   a folder of class folders, SOURCE/<class>/**/<image> (as `speed-fast encode` reads), or a
           .tar / .tar.gz / .tgz archive of the same layout (member paths [./]<class>/.../<image>),
           read in one streaming pass without unpacking it.

Classes are the sorted class-folder names (label = position); images are ordered by relative path.
Each image is converted to RGB, center-cropped to `resolution` with ADM's crop (as DiT; skipped when
the image already has that size) and scaled to [-1, 1] as x / 127.5 - 1. Values are stored as
float16: its spacing in [-1, 1] is at most 2^-11, 1/16 of a pixel level, so the 8-bit values are
recovered exactly by rounding. The sidecar's "source" records {"space": "pixels", ...}, which makes
the evaluator clip its samples (`speed_fast.evaluation.data_space`).

Unreadable images are skipped and reported (their count and first names go into the sidecar).
Images with more than MAX_PIXELS pixels, or an aspect ratio beyond MAX_ASPECT, are skipped the same
way instead of being decoded at full size.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile

import numpy as np
import torch

from .encode import IMAGE_EXTENSIONS, center_crop_arr, scan_image_folder
from .latents import write_latents

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_PIXELS = 64 * 1024 * 1024
MAX_ASPECT = 16.0


def _is_tar(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(TAR_SUFFIXES)


def _decode(data: bytes | str, resolution: int | None) -> np.ndarray:
    """uint8 [R, R, 3] of one image file (path or bytes), center-cropped to `resolution` when given."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        w, h = im.size
        if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"{w}x{h} image: beyond {MAX_PIXELS} pixels or aspect ratio {MAX_ASPECT:g}")
        im = im.convert("RGB")
        if resolution is not None and im.size != (resolution, resolution):
            im = center_crop_arr(im, resolution)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{arr.shape[1]}x{arr.shape[0]} image is not square; give --resolution to center-crop")
    return arr


def _tar_images(path: str):
    """(class name, relative path, bytes) of every image member of a tar of class folders, in archive order."""
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name[2:] if member.name.startswith("./") else member.name
            parts = name.split("/")
            if len(parts) < 2 or any(p.startswith(".") for p in parts) or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            f = tar.extractfile(member)
            if f is not None:
                yield parts[0], name, f.read()


class _Scaled:
    """uint8 images [N, H, W, 3] read as float32 [N, 3, H, W] in [-1, 1], a slice at a time (for write_latents)."""

    def __init__(self, images: np.ndarray):
        self.images = images
        n, h, w, c = images.shape
        self.shape = (n, c, h, w)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[sl])).permute(0, 3, 1, 2)  # (n, 3, H, W)
        return x.float() / 127.5 - 1.0


def write_pixels(source: str, out: str, *, resolution: int | None = None, max_images: int | None = None,
                 progress: bool = True, log=None) -> dict:
    """Write the images of `source` (a folder or tar of class folders) to the pixel .beton `out`;
    returns {"meta": sidecar dict, "images": written, "skipped": count}."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or not 4 <= resolution <= 1024):
        raise ValueError(f"resolution must be an integer in [4, 1024], got {resolution!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ValueError(f"max_images must be an integer >= 1, got {max_images!r}")
    if not out.endswith(".beton"):
        raise ValueError(f"--out must name a .beton file, got {out!r}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a directory; expected a .beton file path")

    records, skipped = [], []  # records: (relative path, class name, uint8 image)

    def add(cls: str, rel: str, data) -> None:
        try:
            records.append((rel, cls, _decode(data, resolution)))
        except Exception as exc:  # any decoder failure means "unreadable": reported and skipped
            skipped.append(rel)
            log(f"[write-pixels] skipped {rel}: {type(exc).__name__}: {exc}")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="image", desc=f"reading {os.path.basename(source.rstrip('/'))}")
    if _is_tar(source):
        for cls, rel, data in _tar_images(source):
            add(cls, rel, data)
            if bar is not None:
                bar.update(1)
    elif os.path.isdir(source):
        paths, labels, classes = scan_image_folder(source)
        for rel, label in zip(paths, labels):
            add(classes[label], rel, os.path.join(source, rel))
            if bar is not None:
                bar.update(1)
    else:
        raise ValueError(f"SOURCE {source!r} must be a folder of class folders or a {'/'.join(TAR_SUFFIXES)} "
                         "archive of them")
    if bar is not None:
        bar.close()
    if not records:
        raise ValueError(f"SOURCE {source!r}: no readable images in class folders ({len(skipped)} skipped; "
                         f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    records.sort(key=lambda r: r[0])
    if max_images is not None:
        records = records[:max_images]
    sizes = {r[2].shape for r in records}
    if len(sizes) > 1:
        raise ValueError(f"SOURCE {source!r}: images of several sizes {sorted(sizes)[:4]}; give --resolution "
                         "to center-crop them to one")
    classes = sorted({r[1] for r in records})
    labels = np.asarray([classes.index(r[1]) for r in records], dtype=np.int64)
    images = np.stack([r[2] for r in records])  # (N, R, R, 3) uint8
    extra = {"space": "pixels", "dataset": os.path.abspath(source), "scaling": "x / 127.5 - 1",
             "resolution": int(images.shape[1]), "skipped": len(skipped), "skipped_files": skipped[:100]}
    meta = write_latents(out, _Scaled(images), labels, class_names=classes, store_dtype="float16", extra=extra,
                         progress=progress)
    return {"meta": meta, "images": int(images.shape[0]), "skipped": len(skipped)}
