"""Image folder -> VAE latents -> latent .beton, resumable: `speed-fast encode` lives here.

Images: IMAGE_DIR/<class>/**/<file>, classes sorted by folder name (label = position), files
sorted by relative path, ADM center crop to `resolution` (DiT's `center_crop_arr`: halve with
BOX while the short side is >= 2x, BICUBIC resize of the short side, center crop), scaled to
[-1, 1]. Latents: a diffusers AutoencoderKL or AutoencoderTiny named as speed_fast.vae.load_vae
takes it (hub id, DiT's ema / mse, local directory, .safetensors file; speed_fast.vae owns the
convention): the posterior mean (or one sample with noise keyed by (seed, image index), so a rerun
draws the same noise; AutoencoderKL only), or AutoencoderTiny's latents, then
(z - shift_factor) * scaling_factor, stored as bf16. The sidecar's source.vae records the VAE's
identity and latent format (speed_fast.vae.vae_record), source.space is "latents".

Resume: the images are cut into shards of `shard_size` consecutive images; each finished shard
(or the part of one that a `max_images` stop left) is written atomically to
`<out>.parts/shard-<start>-<stop>.npz` next to a manifest of the settings and the file list. A
rerun with the same settings encodes only the images no finished shard holds (a shard cut short
by a kill is never on disk), so no image is encoded twice or left out. The .beton is written from
the shards, in image order, once they cover every image; the parts folder is then removed.

Many processes (torchrun / deepspeed launcher, speed_fast.distributed): one job. Rank 0 scans the
folder, checks or writes the manifest and lists what is left; the pieces left are dealt
round-robin to the ranks (disjoint), each rank writes its own shards into the one parts folder
(so --out must be on a file system every rank sees; a rank that cannot see it says so), and
rank 0 writes the .beton when all have finished, holding the output lock (`<out>.lock`) from
start to end, so the job's own ranks are never refused and a second job is. Batches are cut at
multiples of `batch_size` counted from image 0, whichever rank encodes them and after any
interruption, so the .beton is byte-identical to a one-process encode at the same batch size on
the same kind of device and thread count (tests/test_encode_ddp.py), and an interrupted job
resumes with any number of ranks (the batch size is not part of the manifest: a resume at another
batch size is valid, only its bytes may differ in the last bit). Input errors (a missing or
mismatched VAE, changed settings, bad images folder) are found on every rank alike and said once.

Captions (`captions=FILE, text_encoder=NAME`, speed_fast.data.captions): the images are the ones the
caption file names (paths relative to IMAGE_DIR, no class folders), each encoded once as above; the
.beton holds one record per (image, caption) pair in file order, label = the image's index, with
the caption's CLIP embeddings (speed_fast.text) in its "text"/"pooled" fields. Rank 0 embeds the
captions while it writes the .beton, in batches cut at multiples of TEXT_BATCH from the first
record, so the bytes stay independent of the number of ranks. Pairs of an unreadable image are
dropped with it. Captions longer than the encoder takes are truncated (one warning with the count,
and the count in the sidecar's text.truncated). Rank 0 holds every image's latent in memory while it
writes the pairs (COCO train at 256: 118k x 4x32x32 bf16 = 1 GB, twice that with flips).

Unreadable images (not decodable, truncated, unsupported, or past MAX_ASPECT / MAX_PIXELS) are
skipped and reported as they occur; their count and names go into the sidecar's "source" entry.
Symlinks are followed, but each directory and each image file (by device and inode) is taken
once, first in sorted order: a link back into the tree cannot repeat images or loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import uuid

import numpy as np
import torch

from ..vae import latent_factors, load_vae, posterior, resolve_vae, to_latents, vae_record
from .latents import write_latents

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
# Images are refused (reported and skipped) past these limits, read from the header before decoding:
# the center crop resizes the short side to the resolution, so a 1x4000 strip at 256 would become
# 256x1024000 pixels (GBs); 2^26 pixels is an 8192x8192 image (192 MiB as RGB).
MAX_ASPECT = 32
MAX_PIXELS = 1 << 26
_SHARD_RE = re.compile(r"^shard-(\d{9})-(\d{9})\.npz$")
# Settings that must match for a rerun to continue an earlier one.
_MANIFEST_KEYS = ("image_dir", "files_sha256", "num_images", "class_names", "vae", "resolution", "flip",
                  "sample_posterior", "seed", "captions", "text_encoder")


def scan_image_folder(image_dir: str, report: dict | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(relative image paths, int64 labels, class names) of a class-per-folder image tree.

    Entries with an image name that are not regular files (FIFOs, sockets, devices) are never
    opened (a FIFO would block the reader forever): they are left out and listed in
    report["not_regular"]; class folders without images keep their label and are listed in
    report["empty_classes"]."""
    report = {} if report is None else report
    not_regular = report.setdefault("not_regular", [])
    empty = report.setdefault("empty_classes", [])
    if not os.path.isdir(image_dir):
        raise ValueError(f"IMAGE_DIR {image_dir!r} is not a directory")
    classes = sorted(d for d in os.listdir(image_dir)
                     if not d.startswith(".") and os.path.isdir(os.path.join(image_dir, d)))
    if not classes:
        raise ValueError(f"IMAGE_DIR {image_dir!r} has no class sub-folders; expected IMAGE_DIR/<class>/<image>")
    paths, labels = [], []
    seen_dirs, seen_files = set(), set()  # (device, inode): symlinks are followed, each target once
    for label, cls in enumerate(classes):
        found = []
        for root, dirs, files in os.walk(os.path.join(image_dir, cls), followlinks=True):
            st = os.stat(root)
            if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink back into the tree (or a loop)
                dirs[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.relpath(os.path.join(root, f), image_dir) for f in files
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        found.sort()
        count = len(paths)
        for rel in found:
            try:
                st = os.stat(os.path.join(image_dir, rel))
            except OSError:  # a dangling link: kept, reported as unreadable when it is encoded
                st = None
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    not_regular.append(rel)
                    continue
                if (st.st_dev, st.st_ino) in seen_files:
                    continue
                seen_files.add((st.st_dev, st.st_ino))
            paths.append(rel)
            labels.append(label)
        if len(paths) == count:
            empty.append(cls)
    if not paths:
        raise ValueError(f"IMAGE_DIR {image_dir!r} has class folders {classes[:5]} but no image files "
                         f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(labels, dtype=np.int64), classes


def warn_scan(found: dict, command: str, log) -> None:
    """One warning line each for the non-regular entries and the empty classes scan_image_folder found."""
    if found.get("not_regular"):
        log(f"[{command}] warning: skipped {len(found['not_regular'])} entries that are not regular files "
            f"(FIFOs, sockets, devices), never opened: {found['not_regular'][:5]}")
    if found.get("empty_classes"):
        log(f"[{command}] warning: {len(found['empty_classes'])} class folders hold no images (their labels are "
            f"kept, with no samples): {found['empty_classes'][:10]}")


def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop (as in DiT): box-downsample by 2 while possible, bicubic resize, crop the center."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def load_image(path: str, resolution: int) -> torch.Tensor:
    """An image file as float32 [3, R, R] in [-1, 1] after the ADM center crop.
    Raises ValueError, before decoding, for images past MAX_ASPECT or MAX_PIXELS."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"{w}x{h} pixels: aspect ratio beyond {MAX_ASPECT}:1 (MAX_ASPECT)")
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} = {w * h} pixels, more than {MAX_PIXELS} (MAX_PIXELS)")
        img = center_crop_arr(im.convert("RGB"), resolution)
    arr = np.asarray(img, dtype=np.float32)  # (R, R, 3)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R)


class _Images(torch.utils.data.Dataset):
    """Images by global index; an unreadable one yields (zeros, error message) instead of raising."""

    def __init__(self, root: str, paths: list[str], resolution: int):
        self.root, self.paths, self.resolution = root, paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, g: int):
        try:
            return g, load_image(os.path.join(self.root, self.paths[g]), self.resolution), ""
        except Exception as exc:  # any decoder failure means "unreadable": reported and skipped
            return g, torch.zeros(3, self.resolution, self.resolution), f"{type(exc).__name__}: {exc}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _noise(shape, seed: int, index: int, copy: int) -> torch.Tensor:
    """Posterior noise for one image, keyed by (seed, image index, copy) so reruns and resumes agree."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) * 2 + copy)
    return torch.randn(shape, generator=g)


def _finished_shards(parts: str, num_images: int) -> list[tuple[int, int, str]]:
    """Finished shards, in order of their first image; they must be disjoint ranges inside [0, num_images)
    (ranks finish shards out of order, so the finished set need not be a prefix)."""
    shards = []
    for name in os.listdir(parts):
        m = _SHARD_RE.match(name)
        if m:
            shards.append((int(m.group(1)), int(m.group(2)), os.path.join(parts, name)))
        elif name.startswith(".shard-"):  # left by a run killed while writing: never counted
            os.remove(os.path.join(parts, name))
    shards.sort()
    end = 0
    for start, stop, path in shards:
        if start < end or stop <= start or stop > num_images:
            raise ValueError(f"{parts}: shard {os.path.basename(path)} overlaps the finished images before it or "
                             f"lies outside [0, {num_images}); the parts folder was edited by hand. Delete {parts} "
                             "to start over")
        end = stop
    return shards


def _todo(finished: list[tuple[int, int, str]], num_images: int, shard_size: int,
          max_images: int | None) -> list[tuple[int, int]]:
    """The images still to encode as pieces (start, stop): each shard [k * shard_size, (k + 1) * shard_size)
    minus the finished ranges, in order; with max_images, only the first max_images of them."""
    pieces = []
    for lo in range(0, num_images, shard_size):
        hi, cur = min(lo + shard_size, num_images), lo
        for start, stop, _ in finished:
            if stop <= cur or start >= hi:
                continue
            if start > cur:
                pieces.append((cur, start))
            cur = max(cur, stop)
        if cur < hi:
            pieces.append((cur, hi))
    if max_images is not None:
        kept, left = [], max_images
        for start, stop in pieces:
            if left <= 0:
                break
            kept.append((start, min(stop, start + left)))
            left -= kept[-1][1] - start
        pieces = kept
    return pieces


def _batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Images start .. stop - 1 cut at multiples of batch_size: every image is encoded in the same batch
    whichever rank encodes it, after whatever interruption (so the bytes are the same)."""
    out = []
    while start < stop:
        end = min(stop, (start // batch_size + 1) * batch_size)
        out.append(list(range(start, end)))
        start = end
    return out


class _ShardLatents:
    """The finished shards read back as one [N, (2,) C, H, W] bf16 array, a shard at a time (for write_latents)."""

    def __init__(self, shards: list[str]):
        self.files, self.counts = [], []
        for path in shards:
            with np.load(path) as z:
                n = len(z["index"])
                if n:
                    self.files.append(path)
                    self.counts.append(n)
                    shape = z["latents"].shape[1:]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.shape = (total,) + tuple(shape) if total else (0,)
        self._cache = (None, None)

    def __len__(self) -> int:
        return self.shape[0]

    def _shard(self, k: int) -> np.ndarray:
        if self._cache[0] != k:
            with np.load(self.files[k]) as z:
                self._cache = (k, z["latents"])
        return self._cache[1]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        start, stop, _ = sl.indices(len(self))
        out = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo = start - self.offsets[k]
            take = min(stop - start, self.counts[k] - lo)
            out.append(self._shard(k)[lo: lo + take])
            start += take
            k += 1
        return torch.from_numpy(np.concatenate(out)).view(torch.bfloat16)


def encode_folder(image_dir: str, vae: str, out: str, *, resolution: int = 256, flip: bool = False,
                  batch_size: int = 32, sample_posterior: bool = False, seed: int = 0, device: str = "auto",
                  workers: int = 4, shard_size: int = 1024, max_images: int | None = None,
                  keep_parts: bool = False, progress: bool = True, log=None, job=None,
                  captions: str | None = None, text_encoder: str | None = None) -> dict:
    """Encode IMAGE_DIR with the VAE named `vae` (speed_fast.vae.load_vae: a hub id, DiT's ema / mse,
    a local directory or a .safetensors file) into the latent file `out`; returns a status dict
    (done, images, encoded, skipped, parts, meta). On ranks other than 0 it returns when the rank's
    shards are written, with done, skipped and meta None and `encoded` counting the rank's own images;
    rank 0 then writes the .beton alone (so a long write never runs into the job's collective timeout).

    job: a speed_fast.distributed.Job; None opens one here (launch_job(device): one process, or the
    ranks of a torchrun / deepspeed launch). The ranks share the work (see the module docstring).
    captions, text_encoder: a caption file and the text encoder that embeds it (both or neither; module docstring).
    max_images stops after that many more images (a resumable partial run). One encode per output:
    rank 0 holds `<out>.lock` (speed_fast.lockfile) throughout, so a second encode of the same `out`
    is refused (naming the holder) instead of resuming from the first one's live parts, and the
    job's own ranks are never refused.
    """
    if job is None:
        from ..distributed import launch_job

        with launch_job(device) as job:
            return encode_folder(image_dir, vae, out, resolution=resolution, flip=flip, batch_size=batch_size,
                                 sample_posterior=sample_posterior, seed=seed, device=device, workers=workers,
                                 shard_size=shard_size, max_images=max_images, keep_parts=keep_parts,
                                 progress=progress, log=log, job=job, captions=captions, text_encoder=text_encoder)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    job.agree(_check_settings, resolution, batch_size, shard_size, workers, seed, max_images)
    if (captions is None) != (text_encoder is None):
        raise ValueError("--captions and --text-encoder go together: give both for a captioned file, or neither")
    text = {}  # rank 0: the text encoder, loaded before any image is encoded so a bad name costs nothing

    def load_text():
        from ..text import load_text_encoder

        text["encoder"] = load_text_encoder(text_encoder, job.device)
        return text["encoder"].record
    with job.output_lock(out, "encode", log):
        if job.distributed:  # a hub id is downloaded once per machine, then read from the cache by every rank
            job.agree(lambda: resolve_vae(vae) if job.local_rank == 0 else None)
        model = job.agree(load_vae, vae, job.device)
        text_record = job.on_main(load_text) if captions is not None else None
        plan = job.on_main(_plan, image_dir, model, out, resolution, flip, sample_posterior, seed, shard_size,
                           max_images, log, captions, text_record)
        if job.distributed:
            job.agree(_check_parts_visible, plan["parts"])
        mine = plan["pieces"][job.rank::job.world]
        bar = None
        if progress and job.is_main:
            from tqdm import tqdm

            bar = tqdm(total=sum(b - a for a, b in mine), unit="img", file=sys.stderr,
                       desc="encode" if job.world == 1 else f"encode (rank 0 of {job.world})")
        try:
            job.agree(_encode_pieces, model, plan, mine, batch_size, flip, sample_posterior, seed, job.device,
                      workers, bar, log)
        finally:
            if bar is not None:
                bar.close()
        if not job.is_main:  # rank 0 writes the .beton alone; the other ranks are done (no wait, no timeout)
            return {"done": None, "images": len(plan["paths"]), "encoded": sum(b - a for a, b in mine),
                    "skipped": None, "parts": plan["parts"], "meta": None}
        return _finish(plan, out, flip, keep_parts, progress, log, text.get("encoder"))


def write_captioned(out, latents, ok, caption_plan, text_encoder, *, log, command, **kwargs) -> dict:
    """write_latents for a captioned set: `latents` [kept images, ...] of the images with ok[i] True, one record
    per (image, caption) pair of `caption_plan` (speed_fast.data.captions.caption_images) whose image was kept."""
    from .captions import TEXT_BATCH, CaptionText

    ok = np.asarray(ok, dtype=bool)
    row = np.cumsum(ok) - 1  # image index -> row of `latents`
    pairs = caption_plan["pairs"]
    kept = np.flatnonzero(ok[pairs])  # the records: pairs whose image was read
    if kept.size == 0:
        raise ValueError("no (image, caption) pair is left: none of the captioned images could be read")
    text = CaptionText(text_encoder, [caption_plan["captions"][k] for k in kept])
    truncated = text.count_truncated()
    if truncated:
        log(f"[{command}] warning: {truncated} of {kept.size} captions are longer than the text encoder's "
            f"{text_encoder.max_tokens} tokens and were truncated (as CLIP does)")
    meta = text.text_meta(truncated=truncated)
    return write_latents(out, _Rows(latents, row[pairs[kept]]), pairs[kept], text=text.text, pooled=text.pooled,
                         text_meta=meta, chunk=4 * TEXT_BATCH, **kwargs)  # CLIP-L: 256 x 77 x 768 fp32 = 60 MB


class _Rows:
    """Rows `rows` of `array` as an array-like of len(rows) records (read a slice at a time)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape = (len(rows),) + tuple(array.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice):
        return self.array[torch.from_numpy(self.rows[sl])] if isinstance(self.array, torch.Tensor) \
            else self.array[self.rows[sl]]


def _check_parts_visible(parts: str) -> None:
    if not os.path.isfile(os.path.join(parts, "manifest.json")):
        raise ValueError(f"{parts}, made by rank 0, is not visible to this rank: every rank writes its shards "
                         "there, so --out must be on a file system that all the job's machines share")


def _check_settings(resolution, batch_size, shard_size, workers, seed, max_images) -> None:
    for name, value, lo in (("resolution", resolution, 8), ("batch_size", batch_size, 1),
                            ("shard_size", shard_size, 1), ("workers", workers, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be an integer >= 1, got {max_images!r}")


# Fields of a manifest record that may change between runs: how the VAE / text encoder was named
# (`ema` or its hub id), where the caption file lies (its pairs' SHA-256 is what counts).
_FREE_FIELDS = {"vae": "name", "text_encoder": "name", "captions": "file"}


def _same_setting(key: str, old, new) -> bool:
    if key in _FREE_FIELDS and isinstance(old, dict) and isinstance(new, dict):
        free = _FREE_FIELDS[key]
        return {k: v for k, v in old.items() if k != free} == {k: v for k, v in new.items() if k != free}
    return old == new


def _change(key: str, old, new) -> str:
    """`key=OLD, now NEW`; for a record (VAE, text encoder, captions) only the fields that differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        free = _FREE_FIELDS.get(key)
        diff = [k for k in sorted(set(old) | set(new)) if k != free and old.get(k) != new.get(k)]
        head = f"{key} {old.get('name')!r}, now {new.get('name')!r}" if free == "name" else key
        return f"{head} (" + ", ".join(f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in diff) + ")"
    shown = (lambda v: v if not isinstance(v, list) or len(v) < 6 else f"[{len(v)} entries]")
    return f"{key}={shown(old)!r}, now {shown(new)!r}"


def _plan(image_dir, vae, out, resolution, flip, sample_posterior, seed, shard_size, max_images, log,
          captions=None, text_record=None) -> dict:
    """Rank 0: the image list, the manifest (written, or checked against the unfinished encode's) and the
    pieces still to encode. Every rank gets the answer."""
    image_dir = os.path.abspath(image_dir)
    found = {"not_regular": [], "empty_classes": []}
    caption_plan = None
    if captions is not None:
        from .captions import caption_images

        if not os.path.isdir(image_dir):
            raise ValueError(f"IMAGE_DIR {image_dir!r} is not a directory")
        caption_plan = caption_images(captions, image_dir)
        paths, class_names = caption_plan["images"], None
        labels = np.arange(len(paths), dtype=np.int64)
    else:
        paths, labels, class_names = scan_image_folder(image_dir, found)
    warn_scan(found, "encode", log)
    n_images = len(paths)
    record = vae_record(vae)
    if resolution % record["downsampling"]:
        raise ValueError(f"resolution must be a multiple of the VAE's downsampling factor {record['downsampling']}, "
                         f"got {resolution}")
    if sample_posterior and record["class"] != "AutoencoderKL":
        raise ValueError(f"--sample-posterior needs a VAE with a posterior (AutoencoderKL); {record['class']}'s "
                         "encoder is deterministic")
    listing = "\n".join(f"{p}\t{int(y)}" for p, y in zip(paths, labels)).encode()
    manifest = {"image_dir": image_dir, "files_sha256": _sha256(listing), "num_images": n_images,
                "class_names": class_names, "vae": record, "resolution": resolution, "flip": bool(flip),
                "sample_posterior": bool(sample_posterior), "seed": seed,
                "captions": None if caption_plan is None else {"file": os.path.abspath(captions),
                                                               "sha256": caption_plan["sha256"],
                                                               "pairs": len(caption_plan["pairs"])},
                "text_encoder": text_record}
    parts = os.path.abspath(out) + ".parts"
    os.makedirs(parts, exist_ok=True)
    man_path = os.path.join(parts, "manifest.json")
    if os.path.exists(man_path):
        with open(man_path) as f:
            old = json.load(f)
        for key in _MANIFEST_KEYS:
            if not _same_setting(key, old.get(key), manifest[key]):
                raise ValueError(f"{parts} holds an unfinished encode with {_change(key, old.get(key), manifest[key])} "
                                 f"(images or settings changed); rerun with the same settings to continue, or "
                                 f"delete {parts} to start over")
    else:
        with open(man_path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(man_path + ".tmp", man_path)
    finished = _finished_shards(parts, n_images)
    done = sum(stop - start for start, stop, _ in finished)
    if done:
        log(f"encode: resuming after {done} of {n_images} images already encoded in {parts}")
    return {"image_dir": image_dir, "paths": paths, "labels": labels, "class_names": class_names, "found": found,
            "manifest": manifest, "parts": parts, "resolution": resolution, "scale_shift": latent_factors(vae),
            "pieces": _todo(finished, n_images, shard_size, max_images), "captions": caption_plan}


def _finish(plan, out, flip, keep_parts, progress, log, text_encoder=None) -> dict:
    """Rank 0, after every rank has written its shards: the .beton once every image is encoded."""
    parts, paths, labels = plan["parts"], plan["paths"], plan["labels"]
    n_images = len(paths)
    shards = _finished_shards(parts, n_images)
    done = sum(stop - start for start, stop, _ in shards)
    failed = []
    for _, _, path in shards:
        with np.load(path) as z:
            failed += [(int(i), str(m)) for i, m in zip(z["failed"], z["failed_msg"])]
    status = {"done": done == n_images, "images": n_images, "encoded": done, "skipped": len(failed),
              "parts": parts, "meta": None}
    if done < n_images:
        log(f"encode: stopped after {done} of {n_images} images; rerun the same command to continue")
        return status
    source = _ShardLatents([p for _, _, p in shards])
    if len(source) == 0:
        raise ValueError(f"none of the {n_images} images in {plan['image_dir']!r} could be read "
                         f"(first error: {paths[failed[0][0]]}: {failed[0][1]})")
    ok = np.ones(n_images, dtype=bool)
    ok[[i for i, _ in failed]] = False
    found = plan["found"]
    extra = dict(plan["manifest"], encoder="speed_fast.data.encode", space="latents",
                 not_regular=len(found["not_regular"]), not_regular_files=found["not_regular"][:100],
                 empty_classes=found["empty_classes"], images_skipped=len(failed),
                 skipped=[{"path": paths[i], "error": m} for i, m in failed])
    if plan.get("captions") is None:
        meta = write_latents(out, source, labels[ok], class_names=plan["class_names"], store_dtype="bfloat16",
                             flip_copies=bool(flip), extra=extra, progress=progress)
    else:
        meta = write_captioned(out, source[0:len(source)], ok, plan["captions"], text_encoder, flip_copies=bool(flip),
                               store_dtype="bfloat16", extra=extra, progress=progress, log=log, command="encode")
    if failed:
        log(f"encode: skipped {len(failed)} unreadable image(s) of {n_images} (listed in {out}.json, "
            f"source.skipped)")
    if not keep_parts:
        for _, _, path in shards:
            os.remove(path)
        os.remove(os.path.join(parts, "manifest.json"))
        os.rmdir(parts)
    status["meta"] = meta
    return status


@torch.inference_mode()
def _encode_pieces(vae, plan, pieces, batch_size, flip, sample_posterior, seed, dev, workers, bar, log) -> int:
    """Encode this rank's pieces, writing each as a shard, atomically, as soon as it is complete.

    One DataLoader (its workers decode images) serves all of them; batches are cut at multiples of
    batch_size (_batches) and never cross a piece. Returns how many images were unreadable.
    """
    paths, labels, parts = plan["paths"], plan["labels"], plan["parts"]
    scale, shift = plan["scale_shift"]
    batches = [b for start, stop in pieces for b in _batches(start, stop, batch_size)]
    data = iter(torch.utils.data.DataLoader(_Images(plan["image_dir"], paths, plan["resolution"]),
                                            batch_sampler=batches, num_workers=workers if batches else 0))
    unreadable = 0
    for start, stop in pieces:
        kept_idx, kept_lat, failed, failed_msg = [], [], [], []
        for _ in _batches(start, stop, batch_size):
            idx, x, err = next(data)  # idx (b,), x (b, 3, R, R), err: b messages ("" = readable)
            for i in (i for i, e in enumerate(err) if e):
                log(f"encode: skipping unreadable image {paths[int(idx[i])]}: {err[i]}")
                failed.append(int(idx[i]))
                failed_msg.append(err[i])
            good = torch.tensor([i for i, e in enumerate(err) if not e], dtype=torch.long)
            if len(good):
                x = x[good].to(dev)
                lat = []
                for copy, v in enumerate([x, x.flip(-1)] if flip else [x]):
                    z, std = posterior(vae, v)  # (b, C, h, w)
                    if sample_posterior:
                        eps = torch.stack([_noise(z.shape[1:], seed, int(idx[i]), copy) for i in good])
                        z = z + std * eps.to(z.device, z.dtype)
                    lat.append(to_latents(z, scale, shift).to(torch.bfloat16).cpu())
                z = torch.stack(lat, dim=1) if flip else lat[0]  # (b, [2,] C, h, w)
                kept_lat.append(z.view(torch.int16).numpy())
                kept_idx += [int(idx[i]) for i in good]
            if bar is not None:
                bar.update(len(idx))
        lat = np.concatenate(kept_lat) if kept_lat else np.zeros((0,), dtype=np.int16)
        name = f"shard-{start:09d}-{stop:09d}.npz"
        tmp = os.path.join(parts, f".{name}.{uuid.uuid4().hex[:8]}.npz")
        np.savez(tmp, index=np.asarray(kept_idx, dtype=np.int64), labels=labels[kept_idx], latents=lat,
                 failed=np.asarray(failed, dtype=np.int64), failed_msg=np.asarray(failed_msg, dtype=str))
        os.replace(tmp, os.path.join(parts, name))
        unreadable += len(failed)
    return unreadable
