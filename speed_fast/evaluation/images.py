"""Image sets read in batches as uint8 [B, C, H, W], for the Inception metrics.

    images = open_images("samples.npz", "--gen")     # ADM's format: arr_0 uint8 [N, H, W, 3]
    images.n, images.shape                           # N, (C, H, W)
    for batch in images.batches(range(0, 500), 64):  # uint8 [<=64, C, H, W], in order
        ...
    images.stored                                    # {"mu", "sigma", "mu_s", "sigma_s"} found in the file

An ADM sample or reference batch (`.npz` with `arr_0` uint8 [N, H, W, 3]; references also hold
`mu`, `sigma`, `mu_s`, `sigma_s`) is never loaded whole: 50,000 images of 256x256 are 9.8 GB. An
uncompressed member (what np.savez writes) is memory-mapped at its offset in the zip file; a
compressed one is read as a stream from the start of the requested range. The array is located
as `speed_fast.evaluation.load_array` does (keys images, latents, samples, x, arr_0; [N, H, W],
[N, C, H, W] or [N, H, W, C]); float arrays (the older `--save` files, images in [-1, 1]) are
quantised per batch as samples are (`speed_fast.sampling.to_uint8`). Headers are checked against
the bytes that hold them before anything is mapped (`arrays.check_npz_headers`).

`TensorImages` wraps a set already in memory (a run's samples, the digits, a .beton subset).
"""

from __future__ import annotations

import os
import struct
import zipfile

import numpy as np
import torch

from ..sampling import to_uint8
from .arrays import ARRAY_KEYS, _check_header, check_npz_headers

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _layout(shape: tuple, name: str) -> tuple[str, tuple[int, int, int]]:
    """("nchw" | "nhwc" | "nhw", (C, H, W)) of an array of `shape`, by load_array's rules."""
    if len(shape) == 3:
        return "nhw", (1, shape[1], shape[2])
    if len(shape) != 4:
        raise ValueError(f"{name}: expected images [N, H, W, C] (or [N, C, H, W], [N, H, W]), got shape {list(shape)}")
    if shape[-1] in (1, 3) and shape[1] not in (1, 3, 4):
        return "nhwc", (shape[3], shape[1], shape[2])
    return "nchw", (shape[1], shape[2], shape[3])


class _ArrayImages:
    """Batches of an array (a memory map, or a stream) in its own layout, as uint8 NCHW tensors."""

    def __init__(self, name: str, shape: tuple, dtype: np.dtype, stored: dict):
        self.name, self.dtype, self.stored = name, np.dtype(dtype), stored
        if self.dtype != np.uint8 and self.dtype.kind != "f":
            raise ValueError(f"{name}: expected uint8 images or float images in [-1, 1], got dtype {self.dtype}")
        self.layout, self.shape = _layout(tuple(shape), name)
        self.n = int(shape[0])
        self._row_shape = tuple(shape[1:])

    def _convert(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(arr, order="C"))  # a writable copy out of the map / stream buffer
        if self.layout == "nhw":
            x = x[:, None]
        elif self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        if x.dtype != torch.uint8:
            if not torch.isfinite(x).all():
                raise ValueError(f"{self.name} has non-finite values")
            x = to_uint8(x)
        return x.contiguous()  # (B, C, H, W) uint8


class _MappedImages(_ArrayImages):
    def __init__(self, name, array: np.ndarray, stored):
        super().__init__(name, array.shape, array.dtype, stored)
        self._array = array

    def batches(self, rows: range, batch_size: int):
        for s in range(rows.start, rows.stop, batch_size):
            yield self._convert(self._array[s:min(s + batch_size, rows.stop)])


class _StreamedImages(_ArrayImages):
    """A compressed .npz member: read from the start of the member on every pass."""

    def __init__(self, name, path: str, member: str, shape, dtype, stored):
        super().__init__(name, shape, dtype, stored)
        self._path, self._member = path, member
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize

    def _read(self, f, count: int) -> np.ndarray:
        want = count * self._row_bytes
        data = f.read(want)
        if len(data) != want:
            raise ValueError(f"{self.name}: the array ends after {len(data):,} of {want:,} bytes (truncated)")
        return np.frombuffer(data, dtype=self.dtype).reshape((count,) + self._row_shape)

    def batches(self, rows: range, batch_size: int):
        with zipfile.ZipFile(self._path) as z, z.open(self._member) as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            skip = rows.start
            while skip > 0:  # stream past the rows before this range
                step = min(skip, max(1, (64 << 20) // max(1, self._row_bytes)))
                self._read(f, step)
                skip -= step
            for s in range(rows.start, rows.stop, batch_size):
                yield self._convert(self._read(f, min(batch_size, rows.stop - s)))


def _member_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data in the zip file (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: damaged zip entry {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _npy_header(f, size: int, name: str):
    """(shape, dtype, header length) of the .npy data at f, checked against `size` bytes."""
    start = f.tell()
    _check_header(f, size, name)
    f.seek(start)
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
    if fortran:
        raise ValueError(f"{name}: Fortran-ordered arrays are not read; save it with np.ascontiguousarray")
    return shape, dtype, f.tell() - start


def _stored_stats(z: zipfile.ZipFile, path: str) -> dict:
    if not all(f"{k}.npy" in z.namelist() for k in STAT_KEYS):
        return {}
    out = {}
    for k in STAT_KEYS:
        with z.open(f"{k}.npy") as f:
            out[k] = np.lib.format.read_array(f, allow_pickle=False).astype(np.float64)
    return out


def open_images(path, what: str):
    """The image set in a .npy / .npz file (see the module docstring); ValueError naming `what` and
    the file when it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes); expected a .npy or .npz array file")
    name = f"{what} {path!r}"
    try:
        if path.endswith(".npy"):
            with open(path, "rb") as f:
                shape, dtype, header = _npy_header(f, os.path.getsize(path), name)
            images = _MappedImages(name, np.memmap(path, dtype=dtype, mode="r", offset=header, shape=tuple(shape)), {})
        elif path.endswith(".npz"):
            check_npz_headers(path)
            with zipfile.ZipFile(path) as z:
                key = next((k for k in ARRAY_KEYS if f"{k}.npy" in z.namelist()), None)
                if key is None:
                    raise ValueError(f"{name} holds {[n[:-4] for n in z.namelist()]}; expected an image array "
                                     f"under one of {ARRAY_KEYS} (ADM's format: arr_0 uint8 [N, H, W, 3])")
                info = z.getinfo(f"{key}.npy")
                stored = _stored_stats(z, path)
                with z.open(info) as f:
                    shape, dtype, header = _npy_header(f, info.file_size, f"{name}[{key}]")
            if info.compress_type == zipfile.ZIP_STORED:
                offset = _member_offset(path, info) + header
                array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape)) if int(
                    np.prod(shape)) else np.empty(shape, dtype)
                images = _MappedImages(f"{name}[{key}]", array, stored)
            else:
                images = _StreamedImages(f"{name}[{key}]", path, info.filename, shape, dtype, stored)
        else:
            raise ValueError(f"{name}: expected a .npy or .npz file")
    except (EOFError, OSError, zipfile.BadZipFile, struct.error) as exc:
        raise ValueError(f"{name} is not a readable .npy/.npz array ({type(exc).__name__}: {exc})") from None
    if images.n < 1:
        raise ValueError(f"{name} holds no images (shape {[images.n, *images.shape]})")
    return images


class TensorImages:
    """An image set in memory: float [N, C, H, W] in [-1, 1] or uint8, batched like `open_images`'s."""

    def __init__(self, data: torch.Tensor, name: str):
        if data.ndim != 4:
            raise ValueError(f"{name}: expected images [N, C, H, W], got shape {tuple(data.shape)}")
        self.name, self.data, self.stored = name, data, {}
        self.n, self.shape = int(data.shape[0]), tuple(int(s) for s in data.shape[1:])

    def batches(self, rows: range, batch_size: int):
        for s in range(rows.start, rows.stop, batch_size):
            x = self.data[s:min(s + batch_size, rows.stop)]
            yield x if x.dtype == torch.uint8 else to_uint8(x)
