"""Host-side helpers shared by the kernel launchers (`<op>_fwd` in the op files of this package).

* `device_guard`: Triton launches on the current CUDA device and its current stream, so a
  launcher enters the data's device first (tensors on cuda:1 while cuda:0 is current run on
  cuda:1); on CPU tensors (the interpreter) it does nothing.
* `batch` (speed_fast.layout.contiguous_samples): the kernels read any batch stride as long as each
  sample is contiguous (the eps half of a learned-sigma output, model_out[:, :C], is read in
  place); other layouts (channels-last, transposed) are copied to contiguous first, never read
  wrongly.
* the noise kernels' tiling: program (b, p) of grid (B, P) handles Philox counters
  p BLOCK_C .. (p + 1) BLOCK_C - 1 of sample b, 4 elements each, in one warp (two when the
  sample is off counter boundaries). The batch is on axis 0 (up to 2^31 - 1 samples); axis 1
  stops at 65535 programs and the kernels loop over the rest, so no program is entirely masked
  unless the sample's first element is not on a counter boundary (numel per sample not a
  multiple of 4).
"""

from dataclasses import dataclass, field

import torch
import triton

# The leaf module of shared tensor conventions; nothing of speed_fast.ops (which imports this package).
from speed_fast.layout import FLOAT_DTYPES, contiguous_samples as batch  # noqa: F401  (used as launch.*)

BLOCK_C = 512  # Philox counters per program: 2048 elements
NUM_WARPS = 1  # 64 elements per thread: the per-program work (time step, addresses) spreads thin
# Samples off counter boundaries take more registers per element: 32 per thread stay below 255.
NUM_WARPS_UNALIGNED = 2
MAX_GRID_1 = 65535
MAX_BATCH = 2**31 - 1
MAX_SAMPLE = 2**31 - 1 - 4 * BLOCK_C  # element indices within a sample stay in int32


def device_guard(x: torch.Tensor):
    """A context that makes x's CUDA device current (a no-op for CPU tensors)."""
    return torch.cuda.device_of(x)


def check_sizes(B: int, D: int, offset: int) -> None:
    """The limits of the kernels' index arithmetic, as ValueErrors naming the value."""
    if B > MAX_BATCH:
        raise ValueError(f"batch size must be <= {MAX_BATCH} for the triton backend, got {B}")
    if D > MAX_SAMPLE:
        raise ValueError(f"numel per sample must be <= {MAX_SAMPLE} for the triton backend, got {D}")
    if (offset + B) * D >= 2**63:
        raise ValueError(f"(offset + B) * numel_per_sample must be < 2^63, got offset={offset}, B={B}, D={D}")


def num_warps(aligned: bool) -> int:
    """Warps per program of the noise kernels (aligned: numel per sample a multiple of 4)."""
    return NUM_WARPS if aligned else NUM_WARPS_UNALIGNED


def grid(B: int, D: int, aligned: bool) -> tuple[int, int]:
    """(B, P): P programs per sample, each starting on a counter block of the sample."""
    counters = triton.cdiv(D + (0 if aligned else 3), 4)  # the most counters one sample's elements touch
    return B, min(triton.cdiv(counters, BLOCK_C), MAX_GRID_1)


class Pointer:
    """A tensor argument of a compile case: its dtype and whether its address is 16-byte aligned
    (Triton compiles separate variants for aligned and unaligned pointers)."""

    def __init__(self, dtype: torch.dtype, aligned: bool = True):
        self.dtype = dtype
        self.aligned = aligned

    def data_ptr(self) -> int:
        return 0 if self.aligned else 2


@dataclass
class Case:
    """One compiled variant of a kernel, as a launch would bind it (see `speed_fast.kernels.aot`):
    `args` maps the kernel's non-constexpr parameters to values (tensors as Pointer), `elements` is
    what one program covers per loop iteration (None when per-element counts mean nothing), in
    `unit`s (elements, or draws for the time-step kernel)."""

    op: str
    dtype: str
    variant: str
    kernel: object
    args: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = NUM_WARPS
    elements: int | None = None
    unit: str = "elem"


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
