"""The latent file: an FFCV .beton of VAE latents plus a JSON sidecar, written atomically and validated on open.

Layout of `<path>` (FFCV format version 2; the bytes are laid out in speed_fast.data.beton, which
writes and reads them with numpy alone, byte-identical to FFCV's own writer):
  field "latent": NDArrayField int16 (C, H, W) holding bf16/fp16 bit patterns (FFCV's numba
                  pipeline has no 16-bit floats), or float32 (C, H, W) for store_dtype="float32"
  field "label":  IntField (int64 class index)
  captioned files only (write_latents(text=, pooled=)), after those two:
  field "text":   NDArrayField int16 (L, D): the caption's token embeddings (the text encoder's
                  last hidden state, L = its max tokens, D = its width) as float16 bit patterns
  field "pooled": NDArrayField int16 (D,): the caption's pooled embedding, float16 bit patterns
With flipped copies, image i occupies two records: 2i (the image) and 2i + 1 (its horizontal
mirror, encoded separately by the VAE), both with the caption's text; the loader reads one of the
two per epoch.

`<path>.json` (the sidecar) records what FFCV's header cannot: the float dtype behind the bits,
the logical sample count, class names, flip layout, the exact file size and a CRC32, so a
truncated, replaced or foreign file is refused with a message instead of decoding garbage. A
captioned file's sidecar has a "text" section: {"encoder": the text encoder's name, "width": D,
"tokens": L, "dtype": "float16", "null": {"tokens", "pooled"}: the null caption's ("") embedding as
base64 of its little-endian float16 bits (exactly the bits a record would hold; `null_text` decodes
it), plus what the writer added (text_meta's other keys)}. Files without it have no "text" key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import zlib
from typing import Any, Sequence

import numpy as np
import torch

from ..atomic import check_replaceable, publish, temporary_name
from . import beton

FORMAT = "speed_fast.latents"
FORMAT_VERSION = 1
LATENT_FIELD = "latent"
LABEL_FIELD = "label"
TEXT_FIELD = "text"
POOLED_FIELD = "pooled"
TEXT_STORE = "float16"  # how token and pooled embeddings are stored (int16 bit patterns of float16)

# store_dtype -> (torch dtype of the values, numpy dtype of the FFCV field)
STORE_DTYPES = {
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "float16": (torch.float16, np.dtype("<i2")),
    "float32": (torch.float32, np.dtype("<f4")),
}

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Class labels index an embedding table of num_classes + 1 rows (DiT's null class): 2^20 classes are
# ~4.8 GB of fp32 table at DiT-XL's width, far past any class-conditional dataset (ImageNet-21k: 21841).
MAX_CLASSES = 1 << 20


@contextlib.contextmanager
def keep_torch_threads():
    """Undo FFCV's habit of calling torch.set_num_threads (to 1 on import, to num_workers in its Loader):
    the trainer's intra-op thread count is not the loader's business."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class LatentFileError(ValueError):
    """A latent file (or its sidecar) is missing, truncated, corrupted or not what the caller expects."""


def sidecar_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".json"


def _to_torch(block: Any, what: str) -> torch.Tensor:
    """A latent block as a torch tensor without copying where possible."""
    if isinstance(block, torch.Tensor):
        t = block.detach()
        return t.cpu() if t.device.type != "cpu" else t
    arr = np.asarray(block)
    if arr.dtype.kind != "f":
        raise ValueError(f"{what} must hold floating-point latents (float16/32/64 or torch bfloat16), "
                         f"got dtype {arr.dtype}")
    if arr.dtype not in (np.float16, np.float32, np.float64):  # longdouble: torch has no such dtype
        raise ValueError(f"{what} has dtype {arr.dtype} ({arr.dtype.itemsize * 8}-bit extended precision); "
                         "expected float16, float32 or float64 (convert with .astype(np.float64))")
    if not arr.flags.writeable:  # e.g. a read-only memory map; torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


def _to_bits(block: Any, store: str, first_index: int, what: str = "latents") -> np.ndarray:
    """Convert a latent (or text) block to the stored representation (int16 bit patterns or float32),
    rejecting non-finite values."""
    t = _to_torch(block, what)
    if t.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{what} must be float32/float16/bfloat16/float64, got {t.dtype}")
    finite = torch.isfinite(t).flatten(1).all(dim=1)  # (n,)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0]) + first_index
        raise ValueError(f"{what}[{bad}] holds a NaN or infinity; {what} must be finite")
    value_dtype, field_dtype = STORE_DTYPES[store]
    # torch's casts round to nearest even, the same rounding the VAE output gets on GPU.
    stored = t.to(value_dtype).contiguous()
    if t.dtype != value_dtype and not bool(torch.isfinite(stored).all()):
        # A finite value past the store dtype's range would be stored as infinity: refuse before writing.
        mags = t.detach().abs().flatten(1).amax(dim=1).double()  # (n,)
        bad = int(torch.argmax(mags))
        raise ValueError(f"{what}[{bad + first_index}] holds a value of magnitude {float(mags[bad]):.6g}, beyond "
                         f"{store}'s largest finite value {torch.finfo(value_dtype).max:.6g}; it would be stored as "
                         "infinity (rescale the latents, or store them with a wider --store-dtype)")
    out = stored.numpy() if value_dtype == torch.float32 else stored.view(torch.int16).numpy()
    return out.astype(field_dtype, copy=False)


def _check_labels(labels: Any, n: int, class_names: Sequence[str] | None) -> tuple[np.ndarray, int]:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim == 2 and lab.shape[1] == 1:  # fast-DiT keeps labels as (N, 1)
        lab = lab[:, 0]
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must have shape [N] = [{n}] (one per latent), got shape {list(lab.shape)}")
    if lab.dtype.kind not in "iu":
        if not (lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab))):
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if n and lab.max() >= MAX_CLASSES:  # before the int64 cast, which would wrap 1e30 or 2^64 - 1 to a negative
        bad = int(np.argmax(lab))
        raise ValueError(f"labels[{bad}] = {lab[bad]:.6g}; class indices must be < {MAX_CLASSES} (MAX_CLASSES: "
                         "the model's class-embedding table has one row per class)" if lab.dtype.kind == "f" else
                         f"labels[{bad}] = {int(lab[bad])}; class indices must be < {MAX_CLASSES} (MAX_CLASSES: "
                         "the model's class-embedding table has one row per class)")
    lab = lab.astype(np.int64, copy=False)
    if n and lab.min() < 0:
        bad = int(np.argmin(lab))
        raise ValueError(f"labels[{bad}] = {int(lab[bad])}; class indices must be >= 0")
    if n and lab.max() >= MAX_CLASSES:
        bad = int(np.argmax(lab))
        raise ValueError(f"labels[{bad}] = {int(lab[bad])}; class indices must be < {MAX_CLASSES} (MAX_CLASSES: "
                         "the model's class-embedding table has one row per class)")
    if class_names is not None and len(class_names) > MAX_CLASSES:
        raise ValueError(f"{len(class_names)} class_names given; at most {MAX_CLASSES} classes are supported")
    if class_names is not None:
        num_classes = len(class_names)
        if n and lab.max() >= num_classes:
            bad = int(np.argmax(lab))
            raise ValueError(f"labels[{bad}] = {int(lab[bad])} but only {num_classes} class_names were given "
                             f"(expected 0 <= label < {num_classes})")
    else:
        num_classes = int(lab.max()) + 1 if n else 0
    return lab, num_classes


def _b64_bits(arr: Any, what: str) -> str:
    """base64 of an embedding's little-endian float16 bits (refused when not finite or past float16's range)."""
    bits = _to_bits(torch.as_tensor(np.asarray(arr) if not isinstance(arr, torch.Tensor) else arr)[None],
                    TEXT_STORE, 0, what)[0]
    return base64.b64encode(bits.astype("<i2").tobytes()).decode("ascii")


def _check_text(text: Any, pooled: Any, text_meta: dict | None, n: int) -> dict | None:
    """The sidecar's "text" section for write_latents' text arguments (None: not a captioned file)."""
    given = [x is not None for x in (text, pooled, text_meta)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("text, pooled and text_meta go together (a captioned file needs all three), got only "
                         f"{[k for k, g in zip(('text', 'pooled', 'text_meta'), given) if g]}")
    ts = tuple(int(s) for s in getattr(text, "shape", ()))
    ps = tuple(int(s) for s in getattr(pooled, "shape", ()))
    if len(ts) != 3 or ts[0] != n or min(ts) < 1:
        raise ValueError(f"text must have shape [N, L, D] = [{n}, L, D] (one per latent), got shape {list(ts)}")
    if ps != (n, ts[2]):
        raise ValueError(f"pooled must have shape [N, D] = [{n}, {ts[2]}], got shape {list(ps)}")
    if not isinstance(text_meta, dict) or not isinstance(text_meta.get("encoder"), str) \
            or not isinstance(text_meta.get("null"), dict):
        raise ValueError("text_meta must be a dict with 'encoder' (the text encoder's name) and 'null' "
                         f"({{'tokens': [L, D], 'pooled': [D]}}, the null caption's embedding), got {text_meta!r:.200}")
    null = text_meta["null"]
    nt, np_ = null.get("tokens"), null.get("pooled")
    if nt is None or np_ is None or tuple(np.shape(nt)) != ts[1:] or tuple(np.shape(np_)) != ts[2:]:
        raise ValueError(f"text_meta['null'] must hold 'tokens' [{ts[1]}, {ts[2]}] and 'pooled' [{ts[2]}], got shapes "
                         f"{list(np.shape(nt)) if nt is not None else None}, {list(np.shape(np_)) if np_ is not None else None}")
    section = {k: v for k, v in text_meta.items() if k != "null"}
    section.update({"width": ts[2], "tokens": ts[1], "dtype": TEXT_STORE,
                    "null": {"tokens": _b64_bits(nt, "the null caption's tokens"),
                             "pooled": _b64_bits(np_, "the null caption's pooled embedding")}})
    json.dumps(section)  # a non-JSON value in text_meta fails here, before anything is written
    return section


def null_text(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The null caption's embedding of a captioned file (`meta`: its read_latent_meta dict), exactly as
    stored: (tokens float16 [L, D], pooled float16 [D])."""
    text = meta["text"]
    L, D = text["tokens"], text["width"]
    tokens = np.frombuffer(base64.b64decode(text["null"]["tokens"]), dtype="<i2").reshape(L, D)
    pooled = np.frombuffer(base64.b64decode(text["null"]["pooled"]), dtype="<i2").reshape(D)
    return (torch.from_numpy(tokens.astype(np.int16)).view(torch.float16),
            torch.from_numpy(pooled.astype(np.int16)).view(torch.float16))


def _file_crc32(path: str, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(block)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)


def write_latents(
    path: str | os.PathLike,
    latents: Any,
    labels: Any,
    *,
    class_names: Sequence[str] | None = None,
    store_dtype: str = "bfloat16",
    flip_copies: bool = False,
    chunk: int = 4096,
    extra: dict | None = None,
    progress: bool = False,
    writer: str = "numpy",
    text: Any = None,
    pooled: Any = None,
    text_meta: dict | None = None,
) -> dict:
    """Write latents and labels to an FFCV .beton at `path` (+ sidecar `<path>.json`); return the sidecar dict.

    latents: [N, C, H, W] (or [N, 2, C, H, W] with flip_copies=True: [:, 0] the image, [:, 1] its mirror),
      a numpy array (float16/32/64, memory-mapped is fine), a torch tensor (float32/float16/bfloat16)
      or any object with `.shape`, `len()` and slicing that returns one of those (read `chunk` at a time).
    labels: int [N], class indices >= 0 (< len(class_names) when class_names is given).
    store_dtype: "bfloat16" (default; int16 bit patterns), "float16" (bit patterns) or "float32".
    extra: JSON-serialisable provenance stored under "source" in the sidecar (e.g. the VAE used).
    writer: "numpy" (default: speed_fast.data.beton, no FFCV needed) or "ffcv" (FFCV's DatasetWriter
      driven from this process); the two write the same bytes (tests/test_memmap_loader.py).
    text, pooled, text_meta (a captioned file; all three or none): text [N, L, D] the captions' token
      embeddings, pooled [N, D] their pooled embeddings (array-likes as latents, read `chunk` at a
      time; stored as float16, refused when not finite or past float16's range; flipped copies share
      their image's text); text_meta {"encoder": name, "null": {"tokens": [L, D], "pooled": [D]}
      (the null caption's embedding), other JSON keys kept} becomes the sidecar's "text" section.
    Both files appear atomically (temporary files, published together by speed_fast.atomic.publish);
    on any error nothing is left behind and an existing pair is kept as it was.
    """
    path = os.fspath(path)
    if writer not in ("numpy", "ffcv"):
        raise ValueError(f"writer must be 'numpy' or 'ffcv', got {writer!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    shape = tuple(int(s) for s in getattr(latents, "shape", ()))
    want_ndim = 5 if flip_copies else 4
    layout = "[N, 2, C, H, W]" if flip_copies else "[N, C, H, W]"
    if len(shape) != want_ndim or (flip_copies and shape[1] != 2):
        raise ValueError(f"latents must have shape {layout} (flip_copies={flip_copies}), got shape {list(shape)}")
    n = shape[0]
    if n == 0:
        raise ValueError(f"latents is empty (shape {list(shape)}); a latent file needs at least one sample")
    chw = shape[-3:]
    if min(chw) < 1:
        raise ValueError(f"latent shape (C, H, W) must be positive, got {list(chw)}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
    lab, num_classes = _check_labels(labels, n, class_names)
    copies = 2 if flip_copies else 1
    field_dtype = STORE_DTYPES[store_dtype][1]
    text_section = _check_text(text, pooled, text_meta, n)
    extra_fields = [] if text_section is None else [
        (TEXT_FIELD, STORE_DTYPES[TEXT_STORE][1], (text_section["tokens"], text_section["width"])),
        (POOLED_FIELD, STORE_DTYPES[TEXT_STORE][1], (text_section["width"],))]

    def blocks():
        """(record block [k, C, H, W] of field_dtype, labels [k]) in record order, `chunk` samples at a time."""
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = _to_bits(latents[start:stop], store_dtype, start)  # (n, [2,] C, H, W)
            if tuple(block.shape) != (stop - start,) + shape[1:]:
                raise ValueError(f"latents[{start}:{stop}] has shape {list(block.shape)}, "
                                 f"expected {[stop - start] + list(shape[1:])}")
            extras = []
            for (name, _, fshape), arr in zip(extra_fields, (text, pooled)):
                bits = _to_bits(arr[start:stop], TEXT_STORE, start, name)  # (n, *fshape)
                if tuple(bits.shape) != (stop - start,) + fshape:
                    raise ValueError(f"{name}[{start}:{stop}] has shape {list(bits.shape)}, "
                                     f"expected {[stop - start] + list(fshape)}")
                extras.append(np.repeat(bits, copies, axis=0))
            yield block.reshape((-1,) + chw), np.repeat(lab[start:stop], copies), stop - start, extras

    check_replaceable(path, "latent file")
    check_replaceable(sidecar_path(path), "sidecar")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    tmp_json = tmp + ".json"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="latent", desc=f"writing {os.path.basename(path)}")
    try:
        write = _write_numpy if writer == "numpy" else _write_ffcv
        write(tmp, n * copies, field_dtype, chw, blocks(), bar, extra_fields)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shape": list(chw),
            "store_dtype": store_dtype,
            "num_samples": n,
            "num_records": n * copies,
            "flip_copies": bool(flip_copies),
            "num_classes": num_classes,
            "class_names": class_names,
            "file_bytes": os.path.getsize(tmp),
            "crc32": _file_crc32(tmp),
            "source": extra or {},
        }
        if text_section is not None:
            meta["text"] = text_section
        with open(tmp_json, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        publish([(tmp, path), (tmp_json, sidecar_path(path))])  # both, or the old pair stays
        return meta
    finally:
        if bar is not None:
            bar.close()
        for p in (tmp, tmp_json):
            if os.path.exists(p):
                os.remove(p)


def _write_numpy(tmp: str, num_records: int, field_dtype: np.dtype, chw: tuple, blocks, bar, extra_fields) -> None:
    with open(tmp, "wb") as f:
        w = beton.BetonWriter(f, num_records, field_dtype, chw, extra_fields)
        for records, labels, k, extras in blocks:
            w.write(records, labels, extras)
            if bar is not None:
                bar.update(k)
        w.finish()


def _write_ffcv(tmp: str, num_records: int, field_dtype: np.dtype, chw: tuple, blocks, bar, extra_fields) -> None:
    """The same file through FFCV's own header/descriptor/page/allocation-table code, driven from this
    process (its multi-process driver spins forever when a worker dies, and the data is in memory)."""
    with keep_torch_threads():
        from ffcv.fields import IntField, NDArrayField
        from ffcv.memory_allocator import MemoryAllocator
        from ffcv.writer import DatasetWriter, handle_sample

    record_bytes = int(np.prod(chw)) * field_dtype.itemsize + sum(int(np.prod(s)) * d.itemsize for _, d, s in extra_fields)
    fields = {LATENT_FIELD: NDArrayField(field_dtype, chw), LABEL_FIELD: IntField()}
    fields.update({name: NDArrayField(d, s) for name, d, s in extra_fields})
    writer = DatasetWriter(tmp, fields, page_size=beton.page_size_for(record_bytes), num_workers=1)
    writer.num_samples = num_records
    shm = None
    try:
        writer.prepare()
        shm = writer.metadata_sm
        metadata = np.frombuffer(shm.buf, dtype=writer.metadata_type)
        names = writer.metadata_type.names
        allocator = MemoryAllocator(tmp, writer.data_region_start, writer.page_size)
        allocator.__enter__()
        try:
            rec = 0
            for records, labels, k, extras in blocks:
                for i in range(records.shape[0]):
                    handle_sample((records[i], labels[i], *[e[i] for e in extras]), rec, names, metadata,
                                  allocator, fields)
                    rec += 1
                if bar is not None:
                    bar.update(k)
        finally:
            allocator.__exit__(None, None, None)
        writer.finalize(allocator.allocations)
        del metadata  # drop the numpy view before closing the shared memory it points into
        shm.close()
        shm.unlink()
        shm = None
    finally:
        if shm is not None:
            metadata = None  # release our view so the shared memory can close
            shm.unlink()
            try:
                shm.close()
            except BufferError:  # a traceback still references the view; the segment is unlinked already
                pass


def _bad(path: str, what: str) -> LatentFileError:
    return LatentFileError(f"{path}: {what}")


def read_latent_meta(path: str | os.PathLike, *, verify: bool = False) -> dict:
    """Validate the latent file at `path` against its sidecar and return the sidecar dict.

    Checks (cheap, always): the sidecar's format and keys, the exact file size, FFCV's header
    (version, field count, record count), the two field descriptors (names, types, dtype, shape),
    the allocation table (one region per record, the right size, inside the data region) and the
    labels. verify=True also recomputes the CRC32 of the whole file (one full read).
    Raises LatentFileError (a ValueError) naming the file, the bad value and what was expected.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _bad(path, "no such latent file (expected an FFCV .beton written by speed_fast write_latents)")
    side = sidecar_path(path)
    if not os.path.isfile(side):
        raise _bad(path, f"its sidecar {side} is missing; latent files are written by "
                         "`speed-fast encode` / `speed-fast write-latents` / speed_fast.data.write_latents")
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise _bad(path, f"sidecar {side} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, f"sidecar {side} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise _bad(path, f"sidecar version {meta.get('version')!r}, this speed_fast reads version {FORMAT_VERSION}")
    required = ("shape", "store_dtype", "num_samples", "num_records", "flip_copies", "num_classes",
                "class_names", "file_bytes", "crc32")
    missing = [k for k in required if k not in meta]
    if missing:
        raise _bad(path, f"sidecar {side} lacks keys {missing}")
    store = meta["store_dtype"]
    if store not in STORE_DTYPES:
        raise _bad(path, f"sidecar store_dtype {store!r}, expected one of {sorted(STORE_DTYPES)}")
    shape = tuple(meta["shape"]) if isinstance(meta["shape"], list) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise _bad(path, f"sidecar shape {meta['shape']!r}, expected [C, H, W] of positive integers")
    n, n_rec = meta["num_samples"], meta["num_records"]
    copies = 2 if meta["flip_copies"] else 1
    if not isinstance(n, int) or n < 0 or n_rec != n * copies:
        raise _bad(path, f"sidecar num_samples={n!r}, num_records={n_rec!r} (flip_copies={meta['flip_copies']}), "
                         f"expected num_records = {copies} * num_samples")
    if n == 0:
        raise _bad(path, "the dataset is empty (num_samples = 0)")
    text = _check_text_section(path, meta)
    fields = [(LATENT_FIELD, beton.TYPE_NDARRAY_FIELD), (LABEL_FIELD, beton.TYPE_INT_FIELD)]
    if text is not None:
        fields += [(TEXT_FIELD, beton.TYPE_NDARRAY_FIELD), (POOLED_FIELD, beton.TYPE_NDARRAY_FIELD)]
    num_fields = len(fields)

    size = os.path.getsize(path)
    if size != meta["file_bytes"]:
        raise _bad(path, f"file is {size} bytes but was written as {meta['file_bytes']} bytes "
                         "(truncated, appended to or replaced; re-create it)")
    if size < beton.HEADER_TYPE.itemsize:
        raise _bad(path, f"file is {size} bytes, too short for an FFCV header ({beton.HEADER_TYPE.itemsize} bytes)")
    header = beton.read_header(path)
    if int(header["version"]) != beton.CURRENT_VERSION:
        raise _bad(path, f"FFCV format version {int(header['version'])}, expected {beton.CURRENT_VERSION} "
                         "(corrupted header?)")
    if int(header["num_fields"]) != num_fields:
        raise _bad(path, f"has {int(header['num_fields'])} fields, expected {num_fields} ({[f for f, _ in fields]}; "
                         f"the sidecar {'has' if text else 'has no'} 'text' section)")
    if int(header["num_samples"]) != n_rec:
        raise _bad(path, f"header says {int(header['num_samples'])} records, sidecar says {n_rec}")
    desc_end = beton.desc_end(num_fields)
    if size < desc_end:
        raise _bad(path, f"file is {size} bytes, too short for its field descriptors ({desc_end} bytes)")
    descs = beton.read_descriptors(path, num_fields)
    names = [beton.field_name(d) for d in descs]
    if names != [f for f, _ in fields]:
        raise _bad(path, f"fields are {names}, expected {[f for f, _ in fields]}")
    types = [int(d["type_id"]) for d in descs]
    if types != [t for _, t in fields]:
        raise _bad(path, f"field type ids are {types}, expected {[t for _, t in fields]} "
                         f"(FFCV's NDArrayField {beton.TYPE_NDARRAY_FIELD}, IntField {beton.TYPE_INT_FIELD})")
    want_dtype = STORE_DTYPES[store][1]
    arrays = [(0, LATENT_FIELD, want_dtype, shape, f"store_dtype {store!r}")]  # (descriptor, name, dtype, shape, why)
    if text is not None:
        half = STORE_DTYPES[TEXT_STORE][1]
        arrays += [(2, TEXT_FIELD, half, (text["tokens"], text["width"]), "text.dtype 'float16'"),
                   (3, POOLED_FIELD, half, (text["width"],), "text.dtype 'float16'")]
    for i, name, dt, want_shape, why in arrays:
        try:
            field_dtype, field_shape = beton.parse_ndarray_args(descs[i]["arguments"])
        except Exception as exc:  # a corrupted descriptor can fail anywhere in the parser
            raise _bad(path, f"the {name!r} field descriptor is unreadable ({type(exc).__name__}: {exc})") from None
        if field_dtype != dt:
            raise _bad(path, f"field {name!r} has dtype {field_dtype}, expected {dt} ({why})")
        if tuple(field_shape) != tuple(want_shape):
            raise _bad(path, f"field {name!r} has shape {list(field_shape)}, sidecar says {list(want_shape)}")

    meta_end = desc_end + n_rec * beton.record_meta(num_fields).itemsize
    table_ptr = int(header["alloc_table_ptr"])
    n_arrays = len(arrays)
    table_bytes = n_rec * n_arrays * beton.ALLOC_TABLE_TYPE.itemsize
    if table_ptr < meta_end or table_ptr + table_bytes != size:
        raise _bad(path, f"allocation table at byte {table_ptr} with {n_rec * n_arrays} entries does not end the "
                         f"{size}-byte file (corrupted header)")
    records = beton.read_records(path, n_rec, num_fields)
    table = beton.read_alloc_table(path, table_ptr, n_rec * n_arrays)
    ids = table["sample_id"].astype(np.int64)
    if not np.array_equal(np.sort(ids), np.repeat(np.arange(n_rec), n_arrays)):
        raise _bad(path, f"allocation table does not hold exactly {n_arrays} region(s) per record (corrupted)")
    by_ptr = np.argsort(table["ptr"], kind="stable")
    table_ptrs = table["ptr"][by_ptr]
    for i, name, dt, want_shape, _ in arrays:
        nbytes = int(np.prod(want_shape)) * dt.itemsize
        ptrs = records[f"f{i}"]
        at = np.minimum(np.searchsorted(table_ptrs, ptrs), len(table_ptrs) - 1)
        entry = table[by_ptr[at]]
        if np.any(table_ptrs[at] != ptrs) or np.any(entry["sample_id"] != np.arange(n_rec)):
            raise _bad(path, f"{name!r} record pointers do not match the allocation table (corrupted)")
        if np.any(entry["size"] != nbytes):
            raise _bad(path, f"allocation table has {name!r} regions of {np.unique(entry['size'])[:4].tolist()} bytes, "
                             f"expected {nbytes} per record (wrong shape/dtype or corrupted)")
        if np.any(ptrs < meta_end) or np.any(ptrs + nbytes > table_ptr):
            raise _bad(path, f"{name!r} record pointers leave the data region (corrupted)")
    labels = records["f1"]
    k = meta["num_classes"]
    if not isinstance(k, int) or not 1 <= k <= MAX_CLASSES:
        raise _bad(path, f"sidecar num_classes={k!r}, expected an integer in [1, {MAX_CLASSES}]")
    if labels.min() < 0 or labels.max() >= k:
        bad = int(np.argmin(labels) if labels.min() < 0 else np.argmax(labels))
        raise _bad(path, f"record {bad} has label {int(labels[bad])}, expected 0 <= label < num_classes = {k}")
    if verify:
        crc = _file_crc32(path)
        if crc != meta["crc32"]:
            raise _bad(path, f"CRC32 is {crc:#010x}, written as {meta['crc32']:#010x} (the data is corrupted)")
    return meta


def _check_text_section(path: str, meta: dict) -> dict | None:
    """The sidecar's "text" section, checked (None when the file is not captioned)."""
    if "text" not in meta:
        return None
    text = meta["text"]
    if not isinstance(text, dict):
        raise _bad(path, f"sidecar 'text' is {type(text).__name__}, expected an object")
    for key in ("width", "tokens"):
        v = text.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _bad(path, f"sidecar text.{key}={v!r}, expected a positive integer")
    if not isinstance(text.get("encoder"), str):
        raise _bad(path, f"sidecar text.encoder={text.get('encoder')!r}, expected the text encoder's name")
    if text.get("dtype") != TEXT_STORE:
        raise _bad(path, f"sidecar text.dtype={text.get('dtype')!r}, expected {TEXT_STORE!r}")
    null = text.get("null")
    want = {"tokens": text["tokens"] * text["width"] * 2, "pooled": text["width"] * 2}
    for key, nbytes in want.items():
        try:
            raw = base64.b64decode(null[key], validate=True)
        except Exception:  # not a dict, no key, not base64
            raw = None
        if raw is None or len(raw) != nbytes:
            raise _bad(path, f"sidecar text.null.{key} is not base64 of {nbytes} bytes (the null caption's "
                             f"float16 {'[L, D]' if key == 'tokens' else '[D]'} embedding)")
        if not np.all(np.isfinite(np.frombuffer(raw, dtype="<f2"))):
            raise _bad(path, f"sidecar text.null.{key} holds a NaN or infinity")
    return text


def fingerprint(path: str | os.PathLike, meta: dict) -> dict:
    """What identifies a latent file without reading its data (`meta`: its read_latent_meta dict):
    the resolved path, the size, and the SHA-256 of FFCV's header and field descriptors, of the
    record index (per-record pointers and labels, allocation table) and of the sidecar's
    provenance ("source": encoder, VAE, settings). Changed latent bytes are the CRC's job (check_crc)."""
    path = os.path.realpath(os.fspath(path))
    header = beton.read_header(path)
    num_fields = int(header["num_fields"])
    with open(path, "rb") as f:
        head = f.read(beton.desc_end(num_fields))
        index = hashlib.sha256(f.read(meta["num_records"] * beton.record_meta(num_fields).itemsize))
        f.seek(int(header["alloc_table_ptr"]))
        index.update(f.read())
    source = json.dumps(meta.get("source", {}), sort_keys=True).encode()
    return {"path": path, "bytes": os.path.getsize(path), "header_sha256": hashlib.sha256(head).hexdigest(),
            "index_sha256": index.hexdigest(), "source_sha256": hashlib.sha256(source).hexdigest()}


def check_crc(path: str | os.PathLike, meta: dict, *, force: bool = False, cache_dir: str | None = None) -> bool:
    """Check the whole file against the CRC32 its sidecar recorded, once per file version.

    A file whose (size, mtime, inode) was verified before is not read again unless force=True;
    the verified versions are kept in <cache_dir>/verified-latents.json (default: the speed_fast
    cache, see speed_fast.data.digits.default_cache_dir), guarded by a lock so concurrent ranks
    read the file once. Returns True when the file was read now; raises LatentFileError on a mismatch."""
    import fcntl

    from ..paths import cache_dir as default_cache_dir

    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    version = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "crc32": meta["crc32"]}
    cache_dir = cache_dir or default_cache_dir()
    cache = os.path.join(cache_dir, "verified-latents.json")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(os.path.join(cache_dir, "verified-latents.lock"), "w")
    except OSError:  # no writable cache: verify every time
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(cache) as f:
                known = json.load(f)
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        if not force and known.get(path) == version:
            return False
        crc = _file_crc32(path)
        if crc != meta["crc32"]:
            raise _bad(path, f"CRC32 is {crc:#010x}, written as {meta['crc32']:#010x}: the data was changed or "
                             "damaged after it was written (re-create the file)")
        if lock is not None:
            known[path] = version
            tmp = f"{cache}.tmp-{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    json.dump(known, f)
                os.replace(tmp, cache)
            except OSError:
                pass
        return True
    finally:
        if lock is not None:
            lock.close()
