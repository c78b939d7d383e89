"""LatentLoader: the trainer's batches from a latent .beton, through FFCV's compiled pipeline, exactly resumable.

What FFCV's Loader does here: the os_cache memory map, the numba pipeline (our two decoders,
compiled with prange over `num_workers` threads), the batch buffers and the producer thread.
What this file does instead of FFCV's traversal orders: the sample order. FFCV's RANDOM order
in distributed mode pads the dataset (torch's DistributedSampler) so some samples are seen
twice per epoch, and no FFCV order can start mid-epoch. The order and the resumable position
are speed_fast.data.order's (shared with MemmapLoader, which gives the same batches without
FFCV). No process group is needed: rank and world_size are passed in.

The random flip is per (seed, epoch, sample index). When the file holds VAE-encoded mirrored
copies (flip_copies) the loader reads record 2i + flip[i]; otherwise the decoder mirrors the
latent along W while copying it. Either way the choice rides in bit 48 of the sample index that
FFCV hands to the decoders, so it is made inside the compiled parallel loop at no extra pass.

FFCV can hang when its producer thread dies (the consumer blocks on a queue forever). Here the
consumer polls the queue, turns a dead producer into LoaderWorkerError with the original
exception chained, and a stall longer than timeout_s into TimeoutError.

Batches are views of FFCV's rotating buffers: a batch stays valid until the next one is
requested (copy it, e.g. `.to(device)` or `.float()`, to keep it longer).
"""

from __future__ import annotations

import math
import os
import queue
import time

import numpy as np
import torch

from .latents import LABEL_FIELD, LATENT_FIELD, POOLED_FIELD, TEXT_FIELD, keep_torch_threads
from .order import ShardedLoader, epoch_order, int_arg, shard_indices  # noqa: F401  (epoch_order, shard_indices: public here too)

_ID_BITS = 48  # sample ids below 2**48; bit 48 asks the decoder to mirror the latent along W
EPOCH_SPAN_SAMPLES = 1 << 20  # forever(): epochs queued to one producer cover at least this many samples
_ID_MASK = (1 << _ID_BITS) - 1


class LoaderWorkerError(RuntimeError):
    """The FFCV producer thread raised; the original exception is chained as __cause__."""


def _decoders():
    """Our FFCV decoders (classes built on first use so importing this module does not import FFCV)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.pipeline.compiler import Compiler

    class LatentDecoder(NDArrayDecoder):
        """Copies each record into the batch buffer, mirrored along W when bit 48 of its index is set
        (mirror=False: never, for a caption's text, which the flip does not change)."""

        def __init__(self, direct: bool, mirror: bool = True):
            super().__init__()
            self.direct = direct
            self.mirror = mirror

        def generate_code(self):
            shape = [int(s) for s in self.field.shape]
            w_ = shape[-1]
            nbytes = int(np.prod(shape)) * self.field.dtype.itemsize
            mirror = bool(self.mirror)
            if self.direct:
                # os_cache: slice the memory map directly. FFCV's reader binary-searches the whole
                # allocation table for each record's size, which we know (~30% of the decode time).
                size = np.uint64(nbytes)

                def read(ptr, storage_state):
                    return storage_state[0][ptr: ptr + size]

                mem_read = Compiler.compile(read)
            else:
                mem_read = self.memory_read
            rows, half = int(np.prod(shape[:-1])), w_ // 2
            mask = np.uint64(_ID_MASK)
            shift = np.uint64(_ID_BITS)
            one = np.uint64(1)
            my_range = Compiler.get_iterator()
            itemsize = self.field.dtype.itemsize
            # Mirroring by 64-bit words when a row is a power-of-two number of them: word j of a
            # row comes from word j ^ (words - 1), its 16/32-bit lanes reversed. ~2x faster than
            # swapping elements; other shapes swap elements after the copy.
            words = w_ * itemsize // 8
            by_words = itemsize in (2, 4) and w_ * itemsize % 8 == 0 and words & (words - 1) == 0
            last_word = max(words - 1, 0)
            lanes16 = itemsize == 2
            m16 = np.uint64(0x0000FFFF0000FFFF)
            s16, s32 = np.uint64(16), np.uint64(32)
            total_words = nbytes // 8

            def decode(indices, destination, metadata, storage_state):
                n = indices.shape[0]
                short = 0  # a reduction: raising inside prange would serialise the loop
                for ix in my_range(n):
                    raw = indices[ix]
                    data = mem_read(metadata[raw & mask], storage_state)
                    if data.shape[0] != nbytes:
                        short += 1
                        continue
                    if mirror and (raw >> shift) & one:
                        if by_words:
                            src = data.view(np.uint64)
                            dst = destination[ix].reshape(-1).view(np.uint64)
                            for k in range(total_words):
                                v = src[k ^ last_word]
                                v = (v >> s32) | (v << s32)
                                if lanes16:
                                    v = ((v >> s16) & m16) | ((v & m16) << s16)
                                dst[k] = v
                        else:
                            d8 = destination[ix].reshape(-1).view(np.uint8)
                            for k in range(nbytes):
                                d8[k] = data[k]
                            d = destination[ix].reshape(rows, w_)  # (C * H, W)
                            for r in range(rows):
                                for w in range(half):
                                    t = d[r, w]
                                    d[r, w] = d[r, w_ - 1 - w]
                                    d[r, w_ - 1 - w] = t
                    else:
                        # An explicit byte loop: LLVM vectorises it to memcpy speed (`dst[:] = src` is ~6x slower).
                        d8 = destination[ix].reshape(-1).view(np.uint8)
                        for k in range(nbytes):
                            d8[k] = data[k]
                if short > 0:
                    raise ValueError("a latent record is shorter than the field size: "
                                     "the .beton was truncated or changed after it was opened")
                return destination[:n]

            decode.is_parallel = True
            return decode

    class LabelDecoder(IntDecoder):
        """The int64 label of each record, ignoring the flip bit of its index."""

        def generate_code(self):
            mask = np.uint64(_ID_MASK)

            def decode(indices, destination, metadata, storage_state):
                for ix in range(indices.shape[0]):
                    destination[ix, 0] = metadata[indices[ix] & mask]
                return destination[:indices.shape[0]]

            return decode

    return LatentDecoder, LabelDecoder


def _guarded_iterator_class():
    from ffcv.loader.epoch_iterator import EpochIterator

    class GuardedEpochIterator(EpochIterator):
        """FFCV's producer thread, remembering the exception that killed it instead of dying silently."""

        error: BaseException | None = None

        def __init__(self, loader, order):
            self.total = -(-len(order) // loader.batch_size)  # batches this epoch
            self.computed = 0  # batches written into buffers so far
            super().__init__(loader, order)  # starts the thread

        def run_pipeline(self, *args):
            result = super().run_pipeline(*args)
            self.computed += 1
            return result

        def run(self):
            try:
                super().run()
            except BaseException as exc:  # reported to the consumer, re-raised there
                self.error = exc

    return GuardedEpochIterator


class LatentLoader(ShardedLoader):
    """Batches (x, y) of a latent file for one rank: x [B, C, H, W] (bf16 by default), y int64 [B];
    for a captioned file (x, y, tokens [B, L, D], pooled [B, D]), the text as stored (float16).

    path: a .beton written by speed_fast (validated with read_latent_meta on open).
    seed, rank, world_size: the order is a function of (seed, epoch, world_size); rank picks the shard.
    flip: random horizontal flip per (seed, epoch, sample) (the stored mirrored copy when the file has one).
    drop_last: True gives every rank the same number of full batches (samples beyond
      N - N % (world_size * batch_size) wait for another epoch's permutation); False reads every
      sample exactly once, with a short last batch, and ranks may differ by one batch.
    out_dtype: None keeps the stored dtype (a zero-copy bf16/fp16 view of the stored bits);
      a torch float dtype converts (a copy).
    device: "cpu" or a CUDA device (FFCV copies asynchronously on its own streams).
    timeout_s: longest wait for one batch (the first includes numba compiling the pipeline).
    FFCV's calls to torch.set_num_threads are undone: the caller's torch thread count is kept.
    """

    def __init__(self, path, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, flip: bool = False, drop_last: bool = True, device="cpu",
                 os_cache: bool = True, timeout_s: float = 300.0, out_dtype: torch.dtype | None = None,
                 batches_ahead: int = 3):
        import numba

        with keep_torch_threads():
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline import PipelineSpec
            from ffcv.transforms import ToDevice, ToTensor

        super().__init__(path, batch_size, seed=seed, rank=rank, world_size=world_size, flip=flip,
                         drop_last=drop_last, device=device, out_dtype=out_dtype)
        self.num_workers = int_arg("num_workers", num_workers, 1)
        if self.num_workers > numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"num_workers must be <= {numba.config.NUMBA_NUM_THREADS} (numba's thread pool, "
                             f"NUMBA_NUM_THREADS), got {num_workers!r}")
        batches_ahead = int_arg("batches_ahead", batches_ahead, 1)
        if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
                and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        B = self.batch_size

        LatentDecoder, LabelDecoder = _decoders()
        tail = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else [])
        pipelines = {
            LATENT_FIELD: PipelineSpec(LATENT_FIELD, decoder=LatentDecoder(direct=bool(os_cache)), transforms=list(tail)),
            LABEL_FIELD: PipelineSpec(LABEL_FIELD, decoder=LabelDecoder(), transforms=list(tail)),
        }
        if self.captioned:
            for name in (TEXT_FIELD, POOLED_FIELD):
                pipelines[name] = PipelineSpec(name, decoder=LatentDecoder(direct=bool(os_cache), mirror=False),
                                               transforms=list(tail))
        # The order given here is never used: each epoch's order is ours (see the module docstring).
        with keep_torch_threads():
            self._ffcv = Loader(self.path, batch_size=B, num_workers=self.num_workers, os_cache=bool(os_cache),
                                order=OrderOption.SEQUENTIAL, distributed=False, seed=self.seed,
                                pipelines=pipelines, drop_last=False, batches_ahead=batches_ahead)
        if not os_cache:
            self._ffcv.memory_manager = _PlainIdsManager(self._ffcv.memory_manager)
        self._iter_cls = _guarded_iterator_class()
        from ffcv.loader import epoch_iterator

        self._ffcv_cuda = epoch_iterator.IS_CUDA  # FFCV uses CUDA streams whenever torch sees a GPU
        self._active = None

    # ---- order ----------------------------------------------------------------------------

    def _ffcv_ids(self, epoch: int, start_batch: int) -> np.ndarray:
        """FFCV record ids for this rank from `start_batch` on, with the mirror request in bit 48."""
        mine, bits = self.sample_indices(epoch)
        sl = slice(start_batch * self.batch_size, None)
        mine, bits = mine[sl].astype(np.uint64), bits[sl].astype(np.uint64)
        if self._copies == 2:
            return mine * np.uint64(2) + bits  # record 2i + 1 holds the VAE-encoded mirror of image i
        return mine | (bits << np.uint64(_ID_BITS))

    # ---- iteration ------------------------------------------------------------------------

    def __iter__(self):
        """One epoch's batches from the current position (its remaining batches after a resume)."""
        return self._iterate(max_epochs=1)

    def forever(self):
        """Batches epoch after epoch from the current position, endlessly (the trainer's stream).

        With drop_last every epoch holds whole batches, so the orders of several epochs (at least
        EPOCH_SPAN_SAMPLES samples) are handed to one FFCV producer: its pipeline does not drain
        and restart at each epoch boundary (a restart costs ~15 ms: the order, a new thread and
        buffers, the first batches' latency, which is a tenth of a 50k-sample epoch here). The
        batches, their order and the position (`state_dict`) are the same as epoch by epoch."""
        return self._iterate(max_epochs=None)

    def _iterate(self, max_epochs: int | None):
        epochs_done = 0
        while max_epochs is None or epochs_done < max_epochs:
            epoch, start = self._epoch, self._batch
            span = 1 if not self.drop_last else max(1, -(-EPOCH_SPAN_SAMPLES // (self._len * self.batch_size)))
            if max_epochs is not None:
                span = min(span, max_epochs - epochs_done)
            segments = [(epoch + k, start if k == 0 else 0) for k in range(span)]  # (epoch, first batch)
            if self._active is not None:
                self._shutdown(self._active)
            ids = np.concatenate([self._ffcv_ids(e, b) for e, b in segments])
            threads = torch.get_num_threads()
            # FFCV's producer thread sets numba's (thread-local) pool size to num_workers itself.
            it = self._iter_cls(self._ffcv, ids)
            if torch.get_num_threads() != threads:  # FFCV may set torch's thread count: the caller's is kept
                torch.set_num_threads(threads)
            self._active = it
            yield from self._batches(it, segments)
            epochs_done += span

    def _batches(self, it, segments):
        try:
            for epoch, start in segments:
                for b in range(start, self._len):
                    x, y, *text = self._next(it, epoch, b)
                    out = self._batch_out(x, y.view(-1), text)
                    self._advance(epoch, b)
                    yield out
        finally:
            self._shutdown(it)

    def _next(self, it, epoch: int, b: int):
        waited_from = time.monotonic()
        while True:
            try:
                item = it.output_queue.get(timeout=0.05)
            except queue.Empty:
                if it.error is not None or not it.is_alive():
                    try:  # the producer may have queued a batch just before it stopped
                        item = it.output_queue.get_nowait()
                    except queue.Empty:
                        cause = it.error
                        why = f"{type(cause).__name__}: {cause}" if cause is not None else "it exited early"
                        raise LoaderWorkerError(
                            f"{self.path}: the FFCV loader thread stopped while producing batch {b} of epoch "
                            f"{epoch} (rank {self.rank}/{self.world_size}): {why}") from cause
                elif time.monotonic() - waited_from > self.timeout_s:
                    raise TimeoutError(
                        f"{self.path}: no batch from the FFCV loader for {self.timeout_s:.0f} s (batch {b} of "
                        f"epoch {epoch}, rank {self.rank}/{self.world_size}); raise timeout_s if the machine "
                        "is just slow (the first batch includes numba compilation)")
                else:
                    continue
            if item is None:
                raise LoaderWorkerError(f"{self.path}: the FFCV loader ended epoch {epoch} after batch {b - 1}, "
                                        f"expected {self._len} batches")
            slot, result = item
            if self._ffcv_cuda:  # as FFCV's __next__: wait for the copy stream of this slot
                it.current_stream.wait_stream(it.cuda_streams[slot])
            return result

    def _shutdown(self, it) -> None:
        """Stop a producer thread and wait for it, so two never run numba's thread pool at once."""
        it.terminate_event.set()
        deadline = time.monotonic() + self.timeout_s
        while it.is_alive() and time.monotonic() < deadline:
            if it.computed >= it.total:
                # Done computing, maybe blocked in its final put(None): free the queue. Never earlier:
                # a drained queue lets it compute further batches into the buffer the caller may still hold.
                try:
                    while True:
                        it.output_queue.get_nowait()
                except queue.Empty:
                    pass
            it.join(0.05)
        it.close()
        if self._active is it:
            self._active = None


class _PlainIdsManager:
    """Wraps FFCV's process-cache manager so it plans page loads from record ids without our flip bit."""

    def __init__(self, inner):
        self._inner = inner

    def schedule_epoch(self, batches):
        mask = np.uint64(_ID_MASK)
        return self._inner.schedule_epoch([np.asarray(b, dtype=np.uint64) & mask for b in batches])

    def __getattr__(self, name):
        return getattr(self._inner, name)
