"""The sample order and the resumable position shared by every loader of latent files.

    perm  = permutation of range(N) drawn from SeedSequence([seed, epoch])
    flip  = N bits drawn from the same stream after perm (one per sample index)
    rank r, i-th sample of the epoch = perm[i * world_size + r]

so every rank reads a disjoint shard, each sample at most once per epoch (exactly once with
drop_last=False), the order is a pure function of (seed, epoch, world_size), and resuming at
batch b just starts the same sequence at b * batch_size. `ShardedLoader` holds what both loaders
(`LatentLoader` over FFCV, `MemmapLoader` over numpy) share: argument checks, the file's
metadata, batches per epoch, the position and its state dict. Their batches are identical
(tests/test_memmap_loader.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .latents import STORE_DTYPES, TEXT_STORE, read_latent_meta


def int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def epoch_order(num_samples: int, seed: int, epoch: int, flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The epoch's global permutation (int64 [N]) and flip bits (uint8 [N] by sample index, or None)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    perm = rng.permutation(num_samples)
    flips = rng.integers(0, 2, size=num_samples, dtype=np.uint8) if flip else None
    return perm, flips


def shard_indices(num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int, world_size: int,
                  drop_last: bool, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rank `rank`'s sample indices (int64) and flip bits (uint8) for one epoch, in batch order.

    The i-th sample of the rank is perm[i * world_size + rank]; with drop_last the permutation is
    first cut to whole global batches (a multiple of world_size * batch_size).
    """
    perm, flips = epoch_order(num_samples, seed, epoch, flip)
    if drop_last:
        perm = perm[: (num_samples // (world_size * batch_size)) * world_size * batch_size]
    mine = perm[rank::world_size]
    bits = flips[mine] if flips is not None else np.zeros(len(mine), dtype=np.uint8)
    return mine, bits


class ShardedLoader:
    """Base of the latent loaders: checks, metadata, batches per epoch and the resumable position."""

    def __init__(self, path, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 flip: bool = False, drop_last: bool = True, device="cpu", out_dtype: torch.dtype | None = None):
        self.path = os.fspath(path)
        self.batch_size = int_arg("batch_size", batch_size, 1)
        self.seed = int_arg("seed", seed, 0)
        self.world_size = int_arg("world_size", world_size, 1)
        self.rank = int_arg("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {self.world_size}), got {rank!r}")
        self.flip = bool(flip)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
            raise ValueError(f"out_dtype must be None or a torch floating dtype, got {out_dtype!r}")
        self.out_dtype = out_dtype

        self.meta = read_latent_meta(self.path)
        self.num_samples = int(self.meta["num_samples"])
        self.shape = tuple(self.meta["shape"])
        self.num_classes = int(self.meta["num_classes"])
        self._copies = 2 if self.meta["flip_copies"] else 1
        self._stored = STORE_DTYPES[self.meta["store_dtype"]][0]
        # A captioned file (a "text" section): batches are (x, y, tokens [B, L, D], pooled [B, D]).
        self.text = self.meta.get("text")
        self.captioned = self.text is not None

        n, W, B = self.num_samples, self.world_size, self.batch_size
        per_rank = (n // (W * B)) * B if self.drop_last else len(range(self.rank, n, W))
        self._len = -(-per_rank // B)
        if self._len == 0:
            raise ValueError(
                f"{self.path}: {n} samples give rank {self.rank} of {W} no batch of batch_size={B} "
                f"(drop_last={self.drop_last}); need at least {W * B} samples or a smaller batch_size")
        self._epoch = 0
        self._batch = 0

    # ---- position -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch(self) -> int:
        """Index (within the epoch) of the next batch to be handed out."""
        return self._batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the loader at batch `start_batch` of epoch `epoch` (earlier batches are skipped, not read)."""
        epoch = int_arg("epoch", epoch, 0)
        start_batch = int_arg("start_batch", start_batch, 0)
        if start_batch > self._len:
            raise ValueError(f"start_batch must be in [0, {self._len}] (batches per epoch), got {start_batch}")
        self._epoch, self._batch = (epoch + 1, 0) if start_batch == self._len else (epoch, start_batch)

    def _advance(self, epoch: int, b: int) -> None:
        """Position of the next batch after batch b of epoch, set before handing batch b out, so a
        checkpoint taken while training on batch b resumes at b + 1."""
        self._epoch, self._batch = (epoch + 1, 0) if b + 1 == self._len else (epoch, b + 1)

    def state_dict(self) -> dict:
        """Position of the next batch, plus what the order depends on (checked by load_state_dict)."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {key}="
                                 f"{getattr(self, key)!r}; the sample order would differ, so it cannot resume")
        if "epoch" not in state or "batch" not in state:
            raise ValueError(f"loader state needs 'epoch' and 'batch', got keys {sorted(state)}")
        self.set_epoch(state["epoch"], state["batch"])

    # ---- order ----------------------------------------------------------------------------

    def sample_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's sample indices (int64) and flip bits (uint8) for an epoch, in the order batches hold them."""
        return shard_indices(self.num_samples, self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, drop_last=self.drop_last, flip=self.flip)

    def _finish(self, x: torch.Tensor, stored: torch.dtype | None = None) -> torch.Tensor:
        """The stored bits as the stored float dtype (the latents', or `stored`), then out_dtype when asked."""
        stored = stored or self._stored
        x = x.view(stored) if stored != torch.float32 else x
        if self.out_dtype is not None and self.out_dtype != x.dtype:
            x = x.to(self.out_dtype)
        return x

    def _batch_out(self, x: torch.Tensor, y: torch.Tensor, text=()) -> tuple:
        """(x, y) or, for a captioned file, (x, y, tokens, pooled): the text as float16 (or out_dtype)."""
        half = STORE_DTYPES[TEXT_STORE][0]
        return (self._finish(x), y) + tuple(self._finish(t, half) for t in text)
