"""Shared cases of the fused-op tests (test_sample_timesteps, test_sample_and_noise,
test_weighted_mse, test_backends): which backends to compare with the torch reference,
random alias tables, and the dtype-relative tolerance of STYLE.md. (conftest.py switches
Triton's interpreter on where there is no GPU.)
"""

import pytest
import torch

from speed_fast.alias import build_alias_table
from speed_fast.ops import backend_status

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_param():
    try:
        import triton  # noqa: F401
    except ImportError:
        return pytest.param("triton", "cpu", id="triton",
                            marks=pytest.mark.skip(reason="triton is not installed (dev / gpu extra)"))
    return pytest.param("triton", "cuda" if torch.cuda.is_available() else "cpu", id="triton")


# (backend, device) of every backend that is compared with the torch reference.
KERNEL_BACKENDS = [pytest.param("cpp", "cpu", id="cpp"), _triton_param()]


def require(backend: str) -> None:
    """A backend that should run here but does not is a failure, never a skip."""
    ok, why = backend_status(backend)
    assert ok, f"backend {backend} unavailable: {why}"


def tables(T: int, device, seed: int = 0):
    """(prob, alias, sqrt_ab, sqrt_1mab, weights) on `device`: a random alias table of size T
    and positive float32 tables."""
    g = torch.Generator().manual_seed(seed)
    prob, alias = build_alias_table(torch.rand(T, generator=g, dtype=torch.float64) + 0.05)
    abar = torch.linspace(0.999, 0.001, T, dtype=torch.float64)
    weights = torch.rand(T, generator=g) + 0.5
    f32 = dict(dtype=torch.float32, device=device)
    return (prob.to(device), alias.to(device), abar.sqrt().to(**f32), (1 - abar).sqrt().to(**f32),
            weights.to(**f32))


def assert_dtype_close(out: torch.Tensor, ref32: torch.Tensor, ref_dtype: torch.Tensor, atol: float = 1e-5):
    """flash-attention's rule: |out - ref_fp32| <= 2 |ref_in_dtype - ref_fp32| + atol (max over the
    tensor). For 16-bit outputs atol also admits one unit in the last place at the largest
    magnitude: eps differs from the reference by ~1e-7, which can flip a rounding, and Triton's
    interpreter rounds to bfloat16 towards zero where GPUs round to nearest."""
    dtype = ref_dtype.dtype
    out, ref32, ref_dtype = (x.detach().float().cpu() for x in (out, ref32, ref_dtype))
    if ref32.numel() == 0:
        return
    bound = 2 * float((ref_dtype - ref32).abs().max()) + atol
    if dtype != torch.float32:
        bound += float(torch.finfo(dtype).eps) * float(ref32.abs().max())
    err = float((out - ref32).abs().max())
    assert err <= bound, f"max error {err:.3g} exceeds {bound:.3g} ({dtype})"
