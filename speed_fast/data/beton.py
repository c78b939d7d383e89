"""The bytes of a speed_fast latent file (an FFCV .beton, format version 2), in numpy alone.

speed_fast writes one kind of .beton: the fields "latent" (an FFCV NDArrayField of fixed shape and
dtype) and "label" (an FFCV IntField), and for captioned files two more NDArrayFields after them,
"text" (the caption's token embeddings [L, D]) and "pooled" ([D]). Its layout is therefore known
here, and this module writes and reads it without FFCV (which needs a compiled extension that some machines cannot
build, e.g. an offline GPU image): byte for byte what FFCV's own DatasetWriter writes from one
process (`tests/test_memmap_loader.py` compares the two files when FFCV is installed).

    offset 0                      header            HEADER_TYPE (24 bytes)
    24                            field descriptors F x FIELD_DESC_TYPE (type id, name, arguments)
    24 + F * 1041                 record metadata   num_records x record_meta(F) (latent pointer,
                                                    label[, text pointer, pooled pointer])
    align(metadata end, page)     data pages        page_size bytes each; records packed in order,
                                                    a record's fields one after the other, a record
                                                    never straddles two pages
    alloc_table_ptr (= after the  allocation table  one ALLOC_TABLE_TYPE (record id, pointer, size)
    last page)                                      per array field of each record, in record order

The rest of a page is zero, except in captioned files: FFCV allocates a record field by field, and
when a later field does not fit in the page its earlier fields were already copied to the page's
free tail before the record restarts on the next page; those unreferenced bytes are kept, so the
file is still byte for byte FFCV's.

This module imports nothing from FFCV, torch or the rest of speed_fast (a leaf).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

CURRENT_VERSION = 2  # FFCV's format version
MIN_PAGE_SIZE = 1 << 21  # FFCV's smallest page (2 MiB); pages are powers of two
MAX_PAGE_SIZE = 1 << 32
TYPE_INT_FIELD = 1  # FFCV's type ids (ffcv.types.TYPE_ID_HANDLER)
TYPE_NDARRAY_FIELD = 4

# FFCV's on-disk structures (ffcv/types.py and ffcv/fields/ndarray.py), little-endian by definition.
HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                           align=True)
NDARRAY_ARGS_TYPE = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])
# Per-record metadata of the two-field file: the latent's data pointer and the label.
RECORD_META = np.dtype([("", "<u8"), ("", "<i8")], align=True)
DESC_END = HEADER_TYPE.itemsize + 2 * FIELD_DESC_TYPE.itemsize


def record_meta(num_fields: int = 2) -> np.dtype:
    """Per-record metadata: "f0" the latent's pointer, "f1" the label, "f2".. the pointers of the extra arrays."""
    return np.dtype([("", "<u8"), ("", "<i8")] + [("", "<u8")] * (num_fields - 2), align=True)


def desc_end(num_fields: int = 2) -> int:
    """Where the record metadata starts: after the header and the field descriptors."""
    return HEADER_TYPE.itemsize + num_fields * FIELD_DESC_TYPE.itemsize


def page_size_for(record_bytes: int) -> int:
    """The smallest FFCV page (a power of two >= 2 MiB) that holds one record."""
    page = MIN_PAGE_SIZE
    while page < record_bytes:
        page *= 2
    if page >= MAX_PAGE_SIZE:
        raise ValueError(f"a record of {record_bytes} bytes needs a page of {page} bytes; FFCV pages are < 2^32")
    return page


def align_to_page(offset: int, page_size: int) -> int:
    return offset if offset % page_size == 0 else offset + page_size - offset % page_size


def _ndarray_args(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The 1024 argument bytes of an NDArrayField descriptor (shape, then the dtype's JSON descr)."""
    out = np.zeros(1024, dtype="<u1")
    head = np.zeros(1, dtype=NDARRAY_ARGS_TYPE)
    head["shape"][0][: len(shape)] = np.asarray(shape, dtype="<u8")
    descr = np.frombuffer(json.dumps(np.dtype(dtype).descr).encode("ascii"), dtype="<u1")
    head["type_length"][0] = len(descr)
    body = np.concatenate([head.view("<u1"), descr])
    out[: body.shape[0]] = body
    return out


def parse_ndarray_args(arguments: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) from an NDArrayField descriptor's argument bytes; ValueError when unreadable."""
    raw = np.ascontiguousarray(arguments, dtype="<u1")
    head = raw[: NDARRAY_ARGS_TYPE.itemsize].view(NDARRAY_ARGS_TYPE)[0]
    length = int(head["type_length"])
    if not 0 < length <= raw.shape[0] - NDARRAY_ARGS_TYPE.itemsize:
        raise ValueError(f"dtype description length {length} does not fit the descriptor")
    descr = json.loads(raw[NDARRAY_ARGS_TYPE.itemsize:][:length].tobytes().decode("ascii"))
    if not isinstance(descr, list) or len(descr) != 1:
        raise ValueError(f"dtype description {descr!r} is not one field")
    dtype = np.dtype([tuple(x) for x in descr])["f0"]
    shape = [int(s) for s in head["shape"]]
    while shape and shape[-1] == 0:
        shape.pop()
    return dtype, tuple(shape)


def _field_descriptors(field_dtype: np.dtype, shape: tuple[int, ...], extra=()) -> np.ndarray:
    """Descriptors of "latent", "label" and the extra array fields `extra` [(name, dtype, shape)]."""
    fields = [("latent", TYPE_NDARRAY_FIELD, field_dtype, shape), ("label", TYPE_INT_FIELD, None, None)]
    fields += [(name, TYPE_NDARRAY_FIELD, dt, sh) for name, dt, sh in extra]
    desc = np.zeros(len(fields), dtype=FIELD_DESC_TYPE)
    for i, (name, type_id, dt, sh) in enumerate(fields):
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
        desc[i]["type_id"] = type_id
        desc[i]["name"][: len(encoded)] = encoded
        if dt is not None:
            desc[i]["arguments"][:] = _ndarray_args(dt, sh)
    return desc


@dataclass(frozen=True)
class Layout:
    """Where every byte of a file of `num_records` records of `record_bytes` bytes goes
    (`num_fields`: 2, or 4 for a captioned file; record_bytes counts all of a record's arrays)."""

    num_records: int
    record_bytes: int
    page_size: int
    num_fields: int = 2

    @property
    def per_page(self) -> int:
        return self.page_size // self.record_bytes

    @property
    def data_start(self) -> int:
        return align_to_page(desc_end(self.num_fields) + self.num_records * record_meta(self.num_fields).itemsize,
                             self.page_size)

    @property
    def num_pages(self) -> int:
        return -(-self.num_records // self.per_page)

    @property
    def alloc_table_ptr(self) -> int:
        return self.data_start + self.num_pages * self.page_size

    @property
    def arrays(self) -> int:
        """Array fields (allocations) per record: the latent and the extra arrays."""
        return self.num_fields - 1

    @property
    def file_bytes(self) -> int:
        return self.alloc_table_ptr + self.num_records * self.arrays * ALLOC_TABLE_TYPE.itemsize

    def pointers(self) -> np.ndarray:
        """uint64 [num_records]: the byte offset of each record's data."""
        r = np.arange(self.num_records, dtype=np.uint64)
        per = np.uint64(self.per_page)
        return (np.uint64(self.data_start) + (r // per) * np.uint64(self.page_size)
                + (r % per) * np.uint64(self.record_bytes))


class BetonWriter:
    """Writes a latent .beton record by record, in record order, from one process.

        with open(tmp, "wb") as f:
            w = BetonWriter(f, num_records, field_dtype, shape[, extra=[(name, dtype, shape), ...]])
            w.write(block, labels[, [extra block, ...]])  # block: field_dtype [k, *shape], labels int64 [k]
            w.finish()

    The file is the one FFCV's DatasetWriter writes with page_size=page_size_for(record_bytes)
    and one worker, record_bytes counting the latent and every extra array. Memory: one page at a time."""

    def __init__(self, f, num_records: int, field_dtype: np.dtype, shape: tuple[int, ...], extra=()):
        self.f = f
        self.dtype = np.dtype(field_dtype)
        self.shape = tuple(int(s) for s in shape)
        self.extra = [(str(name), np.dtype(dt), tuple(int(s) for s in sh)) for name, dt, sh in extra]
        self.sizes = [int(np.prod(self.shape)) * self.dtype.itemsize] + \
            [int(np.prod(sh)) * dt.itemsize for _, dt, sh in self.extra]  # bytes of each array field
        rb = sum(self.sizes)
        self.layout = Layout(int(num_records), rb, page_size_for(rb), 2 + len(self.extra))
        self.labels = np.zeros(num_records, dtype="<i8")
        self.written = 0
        self._page = np.zeros(self.layout.page_size, dtype="<u1")
        self._in_page = 0
        header = np.zeros(1, dtype=HEADER_TYPE)
        header["version"] = CURRENT_VERSION
        header["num_fields"] = self.layout.num_fields
        header["page_size"] = self.layout.page_size
        header["num_samples"] = num_records
        self._header = header
        f.write(header.tobytes())
        f.write(_field_descriptors(self.dtype, self.shape, self.extra).tobytes())
        # Record metadata is written at the end (FFCV fills it in shared memory, then copies it in);
        # the gap up to the first page is FFCV's zero padding.
        f.write(b"\0" * (self.layout.data_start - desc_end(self.layout.num_fields)))

    def write(self, block: np.ndarray, labels: np.ndarray, extra_blocks=()) -> None:
        arrays = [np.ascontiguousarray(block)] + [np.ascontiguousarray(b) for b in extra_blocks]
        if len(arrays) != 1 + len(self.extra):
            raise ValueError(f"{len(arrays) - 1} extra arrays given, the file has {len(self.extra)}")
        k = arrays[0].shape[0]
        for a, (name, dt, sh) in zip(arrays, [("latent", self.dtype, self.shape)] + self.extra):
            if a.dtype != dt or tuple(a.shape[1:]) != sh or a.shape[0] != k:
                raise ValueError(f"{name} records must be {dt} [{k}, {', '.join(map(str, sh))}], "
                                 f"got {a.dtype} {list(a.shape)}")
        if self.written + k > self.layout.num_records:
            raise ValueError(f"{self.written + k} records written, the file was laid out for {self.layout.num_records}")
        self.labels[self.written:self.written + k] = labels
        rb, per = self.layout.record_bytes, self.layout.per_page
        raw = np.concatenate([a.reshape(k, -1).view("<u1") for a in arrays], axis=1)  # (k, record bytes)
        i = 0
        while i < k:
            if self._in_page == per:
                self._flush(raw[i])
            take = min(per - self._in_page, k - i)
            start = self._in_page * rb
            self._page[start:start + take * rb] = raw[i:i + take].reshape(-1)
            self._in_page += take
            i += take
        self.written += k

    def _flush(self, next_record: np.ndarray | None = None) -> None:
        """Write the full page. `next_record` (the bytes of the record that opens the next page): FFCV
        copies its leading fields into this page's free tail while they fit, before giving up on it."""
        if not self._in_page:
            return
        if next_record is not None:
            free_at = self._in_page * self.layout.record_bytes
            fits = 0
            for size in self.sizes:
                if free_at + fits + size > self.layout.page_size:
                    break
                fits += size
            self._page[free_at:free_at + fits] = next_record[:fits]
        self.f.write(self._page.tobytes())
        self._page.fill(0)
        self._in_page = 0

    def finish(self) -> None:
        """Writes the last page, the allocation table, the record metadata and the final header."""
        if self.written != self.layout.num_records:
            raise ValueError(f"{self.written} records written, the file was laid out for {self.layout.num_records}")
        self._flush()
        lay = self.layout
        if self.f.tell() != lay.alloc_table_ptr:
            raise AssertionError(f"wrote {self.f.tell()} bytes before the allocation table, expected {lay.alloc_table_ptr}")
        ptrs = lay.pointers()
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.uint64)  # of each array in a record
        table = np.zeros((lay.num_records, lay.arrays), dtype=ALLOC_TABLE_TYPE)
        table["sample_id"] = np.arange(lay.num_records, dtype=np.uint64)[:, None]
        table["ptr"] = ptrs[:, None] + offsets[None, :]
        table["size"] = np.asarray(self.sizes, dtype=np.uint64)[None, :]
        self.f.write(table.tobytes())
        meta = np.zeros(lay.num_records, dtype=record_meta(lay.num_fields))
        meta["f0"] = ptrs
        meta["f1"] = self.labels
        for j in range(len(self.extra)):
            meta[f"f{j + 2}"] = table["ptr"][:, j + 1]
        self.f.seek(desc_end(lay.num_fields))
        self.f.write(meta.tobytes())
        self._header["alloc_table_ptr"] = lay.alloc_table_ptr
        self.f.seek(0)
        self.f.write(self._header.tobytes())
        self.f.seek(0, os.SEEK_END)


def read_header(path: str) -> np.void:
    return np.fromfile(path, dtype=HEADER_TYPE, count=1)[0]


def read_descriptors(path: str, num_fields: int = 2) -> np.ndarray:
    return np.fromfile(path, dtype=FIELD_DESC_TYPE, count=num_fields, offset=HEADER_TYPE.itemsize)


def field_name(desc: np.void) -> str:
    return bytes(desc["name"]).rstrip(b"\0").decode("ascii", "replace")


def read_records(path: str, num_records: int, num_fields: int = 2) -> np.ndarray:
    """record_meta(num_fields) [num_records]: each record's data pointer ("f0"), label ("f1") and the
    pointers of its extra arrays ("f2", ...)."""
    return np.fromfile(path, dtype=record_meta(num_fields), count=num_records, offset=desc_end(num_fields))


def read_alloc_table(path: str, table_ptr: int, num_entries: int) -> np.ndarray:
    return np.fromfile(path, dtype=ALLOC_TABLE_TYPE, count=num_entries, offset=table_ptr)
