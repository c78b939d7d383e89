"""Public fused ops of the SpeeD training step, with backend dispatch.

    t = sample_timesteps(prob, alias, n, seed, step)                   # alias method, O(1) per draw
    x_t = add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step)             # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    t, x_t = sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step)
    loss, mse = weighted_mse(pred, t, weights, seed, step)             # mean_b w(t_b) mean_i (pred - eps)^2

eps is never passed around: every op regenerates it from the counter-based RNG
(`speed_fast.rng`) keyed by (seed, step) at the global element index, so
`weighted_mse` sees exactly the noise `add_noise` used. `offset` is the global
index of the batch's first sample (rank * local batch under data parallelism).

Backends: "torch" (reference, anywhere), "cpp" (CPU tensors), "triton" (CUDA
tensors). "auto" picks triton on CUDA, cpp on CPU, and falls back to torch with
a one-time warning; an explicitly requested backend that is unavailable raises.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from .. import rng
from ..alias import check_alias_table

BACKENDS = ("torch", "cpp", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MODULES = {"torch": "._torch", "cpp": "._cpp", "triton": "._triton"}
_loaded: dict[str, object] = {}
_status: dict[str, tuple[bool, str]] = {}
_warned_fallback: set[str] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for one backend; probing happens once per process."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    if name not in _status:
        try:
            mod = importlib.import_module(_MODULES[name], __name__)
            ok, why = mod.available()
        except ImportError as exc:
            ok, why = False, f"import failed: {exc}"
        except Exception as exc:  # a broken build must be reported, not hidden
            ok, why = False, f"{type(exc).__name__}: {exc}"
        _status[name] = (bool(ok), str(why))
        if ok:
            _loaded[name] = mod
    return _status[name]


def available_backends() -> dict[str, tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run on `device` for the requested name."""
    device = torch.device(device)
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        ok, why = backend_status(preferred) if preferred != "torch" else (True, "")
        if ok:
            return preferred
        if preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            warnings.warn(f"speed_fast: {preferred} backend unavailable ({why}); using the torch reference", stacklevel=3)
        return "torch"
    ok, why = backend_status(backend)
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {why}")
    if backend == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' needs CPU tensors, got device {device}")
    return backend


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _impl(backend: str, device):
    """The backend module that runs on `device` (loaded by backend_status)."""
    name = resolve_backend(backend, device)
    backend_status(name)
    return _loaded[name]


# ---------------------------------------------------------------------------
# Validation (shared by every backend; semantics must not depend on it)
# ---------------------------------------------------------------------------


def _check_n(n) -> int:
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise ValueError(f"n must be an integer, got {n!r}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def _check_batch(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be a batch [B, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x.contiguous()


def _check_table(name: str, v: torch.Tensor, T: int | None, device) -> None:
    if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.dtype != torch.float32:
        got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a float32 1-D tensor, got {got}")
    if T is not None and v.numel() != T:
        raise ValueError(f"{name} must have length T={T}, got {v.numel()}")
    if v.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {v.device}")


def _check_t(t: torch.Tensor, B: int, T: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (B,):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be an int64 tensor of shape ({B},), got {got}")
    if t.device != torch.device(device):
        raise ValueError(f"t must be on {device}, got {t.device}")
    if B and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"t must lie in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")


def _check_finite_table(name: str, v: torch.Tensor) -> None:
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(v[i])}")


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------


def sample_timesteps(prob, alias, n, seed=0, step=0, offset=0, backend="auto") -> torch.Tensor:
    """int64 [n] on prob's device: draws offset..offset+n-1 of the alias table at (seed, step)."""
    check_alias_table(prob, alias)
    n = _check_n(n)
    seed, step, offset = rng.check_seed_step(seed, step, offset)
    return _impl(backend, prob.device).sample_timesteps(prob, alias, n, seed, step, offset)


def add_noise(x0, t, sqrt_ab, sqrt_1mab, seed=0, step=0, offset=0, backend="auto") -> torch.Tensor:
    """x_t = sqrt_ab[t] x0 + sqrt_1mab[t] eps(seed, step), in x0's dtype (fp32 arithmetic)."""
    x0 = _check_batch("x0", x0)
    _check_table("sqrt_ab", sqrt_ab, None, x0.device)
    _check_table("sqrt_1mab", sqrt_1mab, sqrt_ab.numel(), x0.device)
    _check_t(t, x0.shape[0], sqrt_ab.numel(), x0.device)
    seed, step, offset = rng.check_seed_step(seed, step, offset)
    return _impl(backend, x0.device).add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset)


def sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed=0, step=0, offset=0, backend="auto"):
    """(t int64 [B], x_t) in one pass: t from the alias table, then add_noise at t."""
    x0 = _check_batch("x0", x0)
    check_alias_table(prob, alias)
    if prob.device != x0.device:
        raise ValueError(f"prob/alias must be on {x0.device}, got {prob.device}")
    _check_table("sqrt_ab", sqrt_ab, prob.numel(), x0.device)
    _check_table("sqrt_1mab", sqrt_1mab, prob.numel(), x0.device)
    seed, step, offset = rng.check_seed_step(seed, step, offset)
    return _impl(backend, x0.device).sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset)


class WeightedMSEFunction(torch.autograd.Function):
    """Fused weighted MSE: the gradient is computed in the forward pass and kept for backward."""

    @staticmethod
    def forward(ctx, pred, t, weights, seed, step, offset, impl):
        loss, grad, mse = impl.weighted_mse_fwd(pred, t, weights, seed, step, offset)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(mse)
        return loss, mse

    @staticmethod
    def backward(ctx, grad_loss, grad_mse):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def weighted_mse(pred, t, weights, seed=0, step=0, offset=0, backend="auto"):
    """(loss, mse): loss = mean_b w(t_b) mean_i (pred_b,i - eps_b,i)^2 as a differentiable fp32
    scalar; mse = the unweighted per-sample mean_i (pred - eps)^2, fp32 [B], detached."""
    pred = _check_batch("pred", pred)
    _check_table("weights", weights, None, pred.device)
    _check_finite_table("weights", weights)
    _check_t(t, pred.shape[0], weights.numel(), pred.device)
    seed, step, offset = rng.check_seed_step(seed, step, offset)
    impl = _impl(backend, pred.device)
    return WeightedMSEFunction.apply(pred, t, weights, seed, step, offset, impl)


from .fused import FusedSpeeD  # noqa: E402  (uses the ops above)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "FusedSpeeD",
    "add_noise",
    "available_backends",
    "backend_status",
    "resolve_backend",
    "sample_and_noise",
    "sample_timesteps",
    "weighted_mse",
]
