"""Label dropout (classifier-free guidance's null class) decided by (seed, micro-step, rank).

The mask is a function of the run's seed and the micro-step, not of any RNG state, so a
resumed run drops the same labels as the uninterrupted one, and ranks drop disjoint samples of
the global micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch

_LABEL_DROP_STREAM = 0x6C616264  # "labd": keeps label-dropout draws apart from other seeded streams


def label_drop_mask(seed: int, micro_step: int, p: float, batch: int, rank: int = 0, world: int = 1,
                    device="cpu") -> torch.Tensor:
    """bool [batch]: which of this rank's labels become the null class at a micro-step. One draw per
    sample of the global micro-batch from a generator seeded with (seed, micro-step), so it is the
    same with or without a resume, and ranks drop disjoint samples."""
    seq = np.random.SeedSequence([seed, micro_step, _LABEL_DROP_STREAM])
    u = np.random.Generator(np.random.PCG64(seq)).random(world * batch)[rank * batch:(rank + 1) * batch]
    return torch.from_numpy(u < p).to(device)
