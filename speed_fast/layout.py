"""The tensor conventions the kernels (`kernels/`, `csrc/`) and the ops (`speed_fast.ops`) share.

A leaf: it imports only torch, so `kernels/` can use it without importing `speed_fast.ops`
(imports go one way: ops -> kernels -> this module; docs/CONTRACT.md, "Import direction").

* FLOAT_DTYPES: the batch dtypes every backend takes.
* samples_contiguous / contiguous_samples: the kernels read any batch stride as long as each
  sample is contiguous (the eps half of a learned-sigma output, model_out[:, :C], is read in
  place); other layouts (channels-last, transposed) are copied to contiguous first, never read
  wrongly.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def samples_contiguous(x: torch.Tensor) -> bool:
    """Whether every sample x[b] of a batch is contiguous, whatever the batch stride (the layout the
    kernels read directly, e.g. the eps half of a learned-sigma output, model_out[:, :C])."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def contiguous_samples(x: torch.Tensor) -> torch.Tensor:
    """x itself when each sample is contiguous (any batch stride), else a contiguous copy."""
    return x if samples_contiguous(x) else x.contiguous()
