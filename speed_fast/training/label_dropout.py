"""Label dropout (classifier-free guidance's null class) decided by (seed, micro-step, rank); the same
for caption dropout (a text model's null caption), from a stream of its own.

The mask is a function of the run's seed and the micro-step, not of any RNG state, so a
resumed run drops the same labels as the uninterrupted one, and ranks drop disjoint samples of
the global micro-batch. `LabelDropout` draws the masks of many micro-steps at once on the host
and moves them to the device in one non-blocking copy, so a training step never waits for a
host-to-device transfer.
"""

from __future__ import annotations

import numpy as np
import torch

_LABEL_DROP_STREAM = 0x6C616264  # "labd": keeps label-dropout draws apart from other seeded streams
CAPTION_DROP_STREAM = 0x63617064  # "capd": caption dropout's draws


def _mask(seed: int, micro_step: int, p: float, batch: int, rank: int, world: int,
          stream: int = _LABEL_DROP_STREAM) -> np.ndarray:
    seq = np.random.SeedSequence([seed, micro_step, stream])
    u = np.random.Generator(np.random.PCG64(seq)).random(world * batch)[rank * batch:(rank + 1) * batch]
    return u < p


def label_drop_mask(seed: int, micro_step: int, p: float, batch: int, rank: int = 0, world: int = 1,
                    device="cpu") -> torch.Tensor:
    """bool [batch]: which of this rank's labels become the null class at a micro-step. One draw per
    sample of the global micro-batch from a generator seeded with (seed, micro-step), so it is the
    same with or without a resume, and ranks drop disjoint samples."""
    return torch.from_numpy(_mask(seed, micro_step, p, batch, rank, world)).to(device)


class LabelDropout:
    """The masks of one rank (`label_drop_mask`'s values), `chunk` micro-steps at a time.

        drop = LabelDropout(seed, p, batch, rank, world, device)
        drop(micro_step)    # bool [batch] on the device; None when p == 0 (the model has no null class)

    A chunk is drawn on the host when a micro-step falls outside the current one and copied to
    the device asynchronously (from pinned memory on CUDA; the caching host allocator keeps the
    pinned buffer until the copy has run)."""

    def __init__(self, seed: int, p: float, batch: int, rank: int = 0, world: int = 1, device="cpu",
                 chunk: int = 256, stream: int = _LABEL_DROP_STREAM):
        self.seed, self.p, self.batch, self.rank, self.world = seed, float(p), batch, rank, world
        self.stream = stream
        self.device = torch.device(device)
        self.chunk = chunk
        self._start = None
        self._masks: torch.Tensor | None = None  # (chunk, batch) bool on the device

    def __call__(self, micro_step: int) -> torch.Tensor | None:
        if self.p == 0:
            return None
        if self._start is None or not self._start <= micro_step < self._start + self.chunk:
            self._fill(micro_step)
        return self._masks[micro_step - self._start]  # (batch,)

    def _fill(self, start: int) -> None:
        host = torch.from_numpy(np.stack([_mask(self.seed, m, self.p, self.batch, self.rank, self.world, self.stream)
                                          for m in range(start, start + self.chunk)]))  # (chunk, batch)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self._masks = host.to(self.device, non_blocking=True)
        self._start = start
