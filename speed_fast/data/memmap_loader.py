"""MemmapLoader: LatentLoader's batches, read with numpy from a memory map of the .beton (no FFCV).

For machines where FFCV cannot be built or imported (an offline GPU image, a Python without a
wheel, a pip install without the `ffcv` extra). The file layout is speed_fast.data.beton's; the
order, shards, flips and resumable position are speed_fast.data.order's, so for the same
(seed, epoch, rank, world_size, batch_size, flip, drop_last) the batches are bit for bit those
of LatentLoader (tests/test_memmap_loader.py compares them across epochs and a mid-epoch resume).

How a batch is read: the data pages are viewed as an array [pages, records per page, record
bytes] over the memory map (every file speed_fast writes packs its records in order, page by
page), the batch's records are gathered with one fancy-indexing copy, mirrored along W where the
flip bit says so (or, for files with encoded mirrors, record 2i + flip is read), and handed out
as a fresh tensor (it stays valid; no rotating buffers). On a CUDA device the batch is copied
from pinned memory without blocking. A background thread prepares `batches_ahead` batches.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from . import beton
from .latents import STORE_DTYPES, TEXT_STORE, LatentFileError
from .order import ShardedLoader, int_arg


class MemmapLoader(ShardedLoader):
    """Batches (x, y) of a latent file for one rank, the same as LatentLoader's, without FFCV
    ((x, y, tokens, pooled) for a captioned file).

    Arguments as LatentLoader's; num_workers is accepted for the same call and unused (one
    vectorised copy per batch), batches_ahead is how many batches the reading thread prepares.
    """

    def __init__(self, path, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 1, flip: bool = False, drop_last: bool = True, device="cpu",
                 out_dtype: torch.dtype | None = None, batches_ahead: int = 2, **_ignored):
        super().__init__(path, batch_size, seed=seed, rank=rank, world_size=world_size, flip=flip,
                         drop_last=drop_last, device=device, out_dtype=out_dtype)
        self.num_workers = int_arg("num_workers", num_workers, 1)
        self.batches_ahead = int_arg("batches_ahead", batches_ahead, 1)
        field_dtype = STORE_DTYPES[self.meta["store_dtype"]][1]
        n_rec = int(self.meta["num_records"])
        # A record's arrays lie one after the other: the latent, then (captioned) the text and the pooled.
        self._parts = [(field_dtype, self.shape)]
        if self.captioned:
            half = STORE_DTYPES[TEXT_STORE][1]
            self._parts += [(half, (self.text["tokens"], self.text["width"])), (half, (self.text["width"],))]
        sizes = [int(np.prod(s)) * d.itemsize for d, s in self._parts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rb = int(self._offsets[-1])
        num_fields = 2 + len(self._parts) - 1
        records = beton.read_records(self.path, n_rec, num_fields)
        self._labels = records["f1"].astype(np.int64)
        ptrs = records["f0"].astype(np.int64)
        for j in range(1, len(self._parts)):
            if np.any(records[f"f{j + 1}"].astype(np.int64) != ptrs + self._offsets[j]):
                raise LatentFileError(f"{self.path}: a record's arrays are not stored one after the other as "
                                      "speed_fast writes them; read this file with the FFCV loader (--loader ffcv)")
        header = beton.read_header(self.path)
        layout = beton.Layout(n_rec, rb, int(header["page_size"]), num_fields)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        if layout.per_page < 1 or layout.alloc_table_ptr > mm.shape[0]:
            raise LatentFileError(f"{self.path}: page size {layout.page_size} does not fit records of {rb} bytes")
        off = ptrs - layout.data_start
        page, within = off // layout.page_size, off % layout.page_size
        if np.any(off < 0) or np.any(within % rb) or np.any(within // rb >= layout.per_page):
            raise LatentFileError(f"{self.path}: records are not packed page by page as speed_fast writes "
                                  "them; read this file with the FFCV loader (--loader ffcv)")
        # [pages, records per page, record bytes] over the data region of the memory map.
        self._pages = np.lib.stride_tricks.as_strided(
            mm[layout.data_start:layout.alloc_table_ptr], shape=(layout.num_pages, layout.per_page, rb),
            strides=(layout.page_size, rb, 1), writeable=False)
        self._page, self._slot = page, within // rb
        self._mm = mm
        self._pin = self.device.type == "cuda"

    def _read(self, idx: np.ndarray, bits: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One batch on the CPU: samples `idx` with flip bits `bits`: (x, y[, tokens, pooled]) as stored."""
        rec = idx * 2 + bits if self._copies == 2 else idx
        raw = self._pages[self._page[rec], self._slot[rec]]  # (B, record bytes), a copy
        arrays = [np.ascontiguousarray(raw[:, self._offsets[j]:self._offsets[j + 1]]).view(d).reshape((len(idx),) + s)
                  for j, (d, s) in enumerate(self._parts)]  # x (B, C, H, W)[, tokens (B, L, D), pooled (B, D)]
        x = arrays[0]
        if self._copies == 1 and bits.any():
            m = bits.astype(bool)
            x[m] = x[m][..., ::-1]
        out = [torch.from_numpy(x), torch.from_numpy(self._labels[rec])] + [torch.from_numpy(a) for a in arrays[1:]]
        if self._pin:
            out = [t.pin_memory() for t in out]
        return tuple(out)

    # ---- iteration ------------------------------------------------------------------------

    def __iter__(self):
        """One epoch's batches from the current position (its remaining batches after a resume)."""
        return self._iterate(max_epochs=1)

    def forever(self):
        """Batches epoch after epoch from the current position, endlessly (the trainer's stream)."""
        return self._iterate(max_epochs=None)

    def _plan(self, max_epochs):
        """(epoch, batch index, sample indices, flip bits) from the current position on."""
        epoch, start = self._epoch, self._batch
        done, B = 0, self.batch_size
        while max_epochs is None or done < max_epochs:
            mine, bits = self.sample_indices(epoch)
            for b in range(start, self._len):
                yield epoch, b, mine[b * B:(b + 1) * B], bits[b * B:(b + 1) * B]
            epoch, start, done = epoch + 1, 0, done + 1

    def _iterate(self, max_epochs):
        """Batches read ahead by one thread into a bounded queue; errors are raised here, in order."""
        q: queue.Queue = queue.Queue(maxsize=self.batches_ahead)
        stop = threading.Event()

        def put(item) -> bool:
            """Queue an item unless the consumer has gone (then False)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for epoch, b, idx, bits in self._plan(max_epochs):
                    if not put((epoch, b, *self._read(idx, bits))):
                        return
                put(None)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)

        thread = threading.Thread(target=produce, name="speed_fast-memmap-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                epoch, b, *batch = item
                if self._pin:
                    batch = [t.to(self.device, non_blocking=True) for t in batch]
                out = self._batch_out(batch[0], batch[1], batch[2:])
                self._advance(epoch, b)
                yield out
        finally:
            stop.set()
            thread.join()
