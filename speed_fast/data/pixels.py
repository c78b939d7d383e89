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

Captions (`captions=FILE, text_encoder=NAME`, as `speed-fast encode --captions`): SOURCE is a folder,
the images are the ones the caption file names (paths relative to SOURCE), one record per (image,
caption) pair in file order with the caption's text embeddings, label = the image's index
(speed_fast.data.captions, speed_fast.data.encode.write_captioned).

Unreadable images are skipped and reported (their count and first names go into the sidecar).
Images past max_pixels(resolution), an aspect ratio beyond MAX_ASPECT or MAX_RATIO x their file
size in decoded bytes are skipped the same way, from the header, instead of being decoded.
A damaged archive (a tar without its end-of-archive marker, a gzip without its trailer, a member
cut short) is refused as a whole. Entries that are not regular files (FIFOs, devices, links in a
tar) and tar members with absolute or '..' paths are never read: they are counted in the sidecar
and a warning line. Class folders without images keep their label and are reported.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import zlib

import numpy as np
import torch

from ..atomic import check_replaceable, temporary_name
from ..lockfile import output_lock
from .encode import IMAGE_EXTENSIONS, center_crop_arr, scan_image_folder, warn_scan, write_captioned
from .latents import sidecar_path, write_latents

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_PIXELS = 64 * 1024 * 1024
MAX_ASPECT = 16.0
MAX_SIDE = 1024  # the largest pixel-space resolution (and image stored without --resolution)
MAX_SCALE = 32  # an image may have up to (MAX_SCALE x resolution)^2 pixels ...
MIN_CAP = 1 << 22  # ... or 4 Mpixel, whichever is more
MAX_RATIO = 1032  # deflate's largest compression ratio: a PNG never decodes to more than this x its size


def _is_tar(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(TAR_SUFFIXES)


def max_pixels(resolution: int | None) -> int:
    """The most pixels one image may decode to: relative to --resolution (the center crop only ever
    needs the short side at the resolution, so (MAX_SCALE R)^2 leaves room for any photo of that
    size class), at least MIN_CAP, never past MAX_PIXELS; without --resolution the image is stored
    as it is, so it must fit the largest pixel resolution (MAX_SIDE^2)."""
    if resolution is None:
        return MAX_SIDE * MAX_SIDE
    return min(MAX_PIXELS, max(MIN_CAP, (MAX_SCALE * resolution) ** 2))


def _decode(data: bytes | str, resolution: int | None) -> np.ndarray:
    """uint8 [R, R, 3] of one image file (path or bytes), center-cropped to `resolution` when given.
    Refused from the header, before decoding: more pixels than max_pixels(resolution), an aspect
    ratio past MAX_ASPECT, or more decoded bytes than MAX_RATIO x the file's size (a decompression bomb)."""
    from PIL import Image

    compressed = len(data) if isinstance(data, bytes) else os.path.getsize(data)
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        w, h = im.size
        cap = max_pixels(resolution)
        if w * h > cap or max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"{w}x{h} image: beyond {cap} pixels (for --resolution {resolution}) or aspect ratio "
                             f"{MAX_ASPECT:g}")
        if 3 * w * h > MAX_RATIO * compressed + (1 << 16):
            raise ValueError(f"{w}x{h} image from {compressed} bytes: it would decode to {3 * w * h} bytes, more than "
                             f"{MAX_RATIO}x its size (a decompression bomb?)")
        im = im.convert("RGB")
        if resolution is not None and im.size != (resolution, resolution):
            im = center_crop_arr(im, resolution)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{arr.shape[1]}x{arr.shape[0]} image is not square; give --resolution to center-crop")
    return arr


def _damaged(path: str, what: str) -> ValueError:
    return ValueError(f"SOURCE {path!r} is a damaged or incomplete archive: {what}; nothing was written")


def _tar_images(path: str, report: dict):
    """(class name, relative path, bytes) of every image member of a tar of class folders, in archive order.

    The archive must be whole: tarfile stops quietly at a damaged header, so after the last member
    the two zero blocks of the end-of-archive marker must follow, and a compressed archive is read
    to its end (gzip checks its length and CRC trailer there). Anything else raises ValueError.
    Members that are not regular files (links, devices, FIFOs) and absolute or '..' paths are never
    read; they are counted in `report` ("skipped_members": {kind: count}, "skipped_member_names"),
    and `report["class_dirs"]` collects the class folders the archive names."""
    kinds = report.setdefault("skipped_members", {})
    names = report.setdefault("skipped_member_names", [])
    class_dirs = report.setdefault("class_dirs", set())

    def skip(kind: str, name: str) -> None:
        kinds[kind] = kinds.get(kind, 0) + 1
        if len(names) < 100:
            names.append(name)

    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                raw = member.name
                name = raw[2:] if raw.startswith("./") else raw
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if raw.startswith("/") or ".." in parts:
                    skip("absolute or parent-relative path", raw)
                    continue
                if member.isdir():
                    if len(parts) == 1 and not parts[0].startswith("."):
                        class_dirs.add(parts[0])
                    continue
                if not member.isfile():
                    kind = ("symlink" if member.issym() else "hardlink" if member.islnk() else
                            "fifo" if member.isfifo() else "device" if member.isdev() else "other")
                    skip(kind, raw)
                    continue
                if len(parts) < 2 or any(p.startswith(".") for p in parts) \
                        or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                class_dirs.add(parts[0])
                f = tar.extractfile(member)
                data = f.read()
                if len(data) != member.size:
                    raise _damaged(path, f"member {raw!r} holds {len(data)} of its {member.size} bytes")
                yield parts[0], "/".join(parts), data
            fileobj = tar.fileobj
            fileobj.seek(tar.offset)
            end = fileobj.read(2 * tarfile.BLOCKSIZE)
            if end != bytes(2 * tarfile.BLOCKSIZE):
                raise _damaged(path, f"after {len(tar.members)} members, byte {tar.offset} holds "
                                     f"{'a damaged header' if end.strip(bytes(1)) else 'too few bytes'}, "
                                     "expected the end-of-archive marker (two zero blocks)")
            while fileobj.read(1 << 20):  # a compressed stream is checked at its end (gzip: size and CRC)
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None  # one line


class _Scaled:
    """uint8 images [M, H, W, 3] (a memory map) read as float32 [N, 3, H, W] in [-1, 1] in the order
    `order` (indices into the M images), a slice at a time (for write_latents)."""

    def __init__(self, images: np.ndarray, order: np.ndarray):
        self.images, self.order = images, order
        _, h, w, c = images.shape
        self.shape = (len(order), c, h, w)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[self.order[sl]])).permute(0, 3, 1, 2)  # (n, 3, H, W)
        return x.float() / 127.5 - 1.0


def write_pixels(source: str, out: str, *, resolution: int | None = None, max_images: int | None = None,
                 progress: bool = True, log=None, captions: str | None = None, text_encoder: str | None = None) -> dict:
    """Write the images of `source` (a folder or tar of class folders) to the pixel .beton `out`;
    returns {"meta": sidecar dict, "images": written, "skipped": count}.

    Memory does not grow with the dataset: decoded images go to a temporary file next to `out`
    (memory-mapped when the .beton is written), and the free disk is checked against the .beton's
    size first. `<out>.lock` is held throughout (one writer per output)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or not 4 <= resolution <= MAX_SIDE):
        raise ValueError(f"resolution must be an integer in [4, {MAX_SIDE}], got {resolution!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ValueError(f"max_images must be an integer >= 1, got {max_images!r}")
    if not out.endswith(".beton"):
        raise ValueError(f"--out must name a .beton file, got {out!r}")
    check_replaceable(out, "--out")
    check_replaceable(sidecar_path(out), "--out's sidecar")
    if not (_is_tar(source) or os.path.isdir(source)):
        raise ValueError(f"SOURCE {source!r} must be a folder of class folders or a {'/'.join(TAR_SUFFIXES)} "
                         "archive of them")
    text = None
    if (captions is None) != (text_encoder is None):
        raise ValueError("--captions and --text-encoder go together: give both for a captioned file, or neither")
    if captions is not None:
        if not os.path.isdir(source):
            raise ValueError(f"SOURCE {source!r}: --captions needs a folder (the caption file names images under it)")
        if max_images is not None:
            raise ValueError("--max-images does not apply with --captions (shorten the caption file instead)")
        from ..text import load_text_encoder
        from .captions import caption_images

        text = (caption_images(captions, source), load_text_encoder(text_encoder))
    with output_lock(out, "write-pixels", log):
        scratch = temporary_name(out) + ".pixels"
        try:
            if text is not None:
                return _write_captioned_pixels(source, out, scratch, resolution, progress, log, *text)
            return _write_pixels(source, out, scratch, resolution, max_images, progress, log)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)


def _write_pixels(source, out, scratch, resolution, max_images, progress, log) -> dict:
    records, skipped = [], []  # records: (relative path, class name, image index in `scratch`)
    shape = None
    found: dict = {}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="image", desc=f"reading {os.path.basename(source.rstrip('/'))}")
    with open(scratch, "wb") as f:
        def add(cls: str, rel: str, data) -> None:
            nonlocal shape
            try:
                img = _decode(data, resolution)
            except Exception as exc:  # any decoder failure means "unreadable": reported and skipped
                skipped.append(rel)
                log(f"[write-pixels] skipped {rel}: {type(exc).__name__}: {exc}")
                return
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise ValueError(f"SOURCE {source!r}: images of several sizes ({shape[1]}x{shape[0]} and {rel} "
                                 f"{img.shape[1]}x{img.shape[0]}); give --resolution to center-crop them to one")
            f.write(img.tobytes())
            records.append((rel, cls, len(records)))
            if bar is not None:
                bar.update(1)

        if _is_tar(source):
            for cls, rel, data in _tar_images(source, found):
                add(cls, rel, data)
        else:
            paths, labels, classes = scan_image_folder(source, found)
            found["class_dirs"] = set(classes)
            for rel, label in zip(paths, labels):
                add(classes[label], rel, os.path.join(source, rel))
    if bar is not None:
        bar.close()
    if not records:
        raise ValueError(f"SOURCE {source!r}: no readable images in class folders ({len(skipped)} skipped; "
                         f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    records.sort(key=lambda r: r[0])
    classes = sorted(found["class_dirs"])
    with_images = {r[1] for r in records}
    if max_images is not None:
        records = records[:max_images]
    empty = [c for c in classes if c not in with_images]
    members = found.get("skipped_members", {})
    warn_scan(dict(found, empty_classes=empty), "write-pixels", log)
    if members:
        log(f"[write-pixels] warning: skipped {sum(members.values())} archive members that are not regular files "
            f"inside SOURCE ({', '.join(f'{v} {k}' for k, v in sorted(members.items()))}), never read: "
            f"{found['skipped_member_names'][:5]}")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[r[1]] for r in records], dtype=np.int64)
    order = np.asarray([r[2] for r in records], dtype=np.int64)
    need = int(order.size) * int(np.prod(shape)) * 2 + (1 << 22)  # float16 records + headers and tables
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if need > free:
        raise ValueError(f"--out {out!r}: {order.size} images of {shape[1]}x{shape[0]} need about {need} bytes, "
                         f"{free} are free on its file system")
    images = np.memmap(scratch, dtype=np.uint8, mode="r", shape=(os.path.getsize(scratch) // int(np.prod(shape)),)
                       + tuple(shape))  # (M, R, R, 3)
    extra = {"space": "pixels", "dataset": os.path.abspath(source), "scaling": "x / 127.5 - 1",
             "resolution": int(shape[0]), "skipped": len(skipped), "skipped_files": skipped[:100],
             "not_regular": len(found.get("not_regular", [])), "not_regular_files": found.get("not_regular", [])[:100],
             "skipped_members": members, "skipped_member_names": found.get("skipped_member_names", []),
             "empty_classes": empty}
    try:
        meta = write_latents(out, _Scaled(images, order), labels, class_names=classes, store_dtype="float16",
                             extra=extra, progress=progress)
    finally:
        del images
    return {"meta": meta, "images": int(order.size), "skipped": len(skipped)}


def _write_captioned_pixels(source, out, scratch, resolution, progress, log, caption_plan, encoder) -> dict:
    """The images a caption file names, decoded as _write_pixels does, one record per (image, caption) pair."""
    images, skipped, shape = caption_plan["images"], [], None
    ok = np.zeros(len(images), dtype=bool)
    with open(scratch, "wb") as f:
        for i, rel in enumerate(images):
            try:
                img = _decode(os.path.join(source, rel), resolution)
            except Exception as exc:  # any decoder failure means "unreadable": reported and skipped
                skipped.append(rel)
                log(f"[write-pixels] skipped {rel}: {type(exc).__name__}: {exc}")
                continue
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise ValueError(f"SOURCE {source!r}: images of several sizes ({shape[1]}x{shape[0]} and {rel} "
                                 f"{img.shape[1]}x{img.shape[0]}); give --resolution to center-crop them to one")
            f.write(img.tobytes())
            ok[i] = True
    if shape is None:
        raise ValueError(f"SOURCE {source!r}: none of the {len(images)} images the captions name could be read")
    pixels = np.memmap(scratch, dtype=np.uint8, mode="r", shape=(int(ok.sum()),) + tuple(shape))  # (M, R, R, 3)
    extra = {"space": "pixels", "dataset": os.path.abspath(source), "scaling": "x / 127.5 - 1",
             "resolution": int(shape[0]), "skipped": len(skipped), "skipped_files": skipped[:100],
             "captions": {"sha256": caption_plan["sha256"], "pairs": len(caption_plan["pairs"]), "images": len(images)}}
    try:
        meta = write_captioned(out, _Scaled(pixels, np.arange(int(ok.sum()))), ok, caption_plan, encoder,
                               store_dtype="float16", extra=extra, progress=progress, log=log, command="write-pixels")
    finally:
        del pixels
    return {"meta": meta, "images": int(ok.sum()), "skipped": len(skipped)}
