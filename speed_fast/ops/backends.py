"""The backend table of the fused ops: which backends exist, whether each can run here, and
which one runs a call (contract in docs/CONTRACT.md, "The fused training step").

    torch   the references (`<op>_ref` in each op file); runs anywhere
    cpp     C++/OpenMP kernels (`_cpp.py`, sources in csrc/), CPU tensors
    triton  Triton kernels (`_triton.py`, sources in kernels/), CUDA tensors, or CPU tensors
            under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)

A kernel backend module exposes the same four functions with the same arguments, already
validated by the op files:

    sample_timesteps(prob, alias, n, seed, step, offset) -> int64 [n]
    add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset) -> x_t (x0's dtype)
    sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset) -> (t, x_t)
    weighted_mse_fwd(pred, t, weights, seed, step, offset) -> (loss fp32 [], grad (pred's dtype), mse fp32 [B])

and `available() -> (bool, reason)`, asked once per process. "auto" picks triton on CUDA and
cpp on CPU, falling back to torch with a one-time warning that carries the reason; an
explicitly requested backend that cannot run raises BackendUnavailable with it.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

# name -> module of the kernel backend (None: the references in the op files).
BACKENDS = {"torch": None, "cpp": "._cpp", "triton": "._triton"}

_loaded: dict[str, object] = {}
_status: dict[str, tuple[bool, str]] = {}
_warned_fallback: set[str] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for one backend; probing happens once per process."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)} or 'auto', got {name!r}")
    if name not in _status:
        if BACKENDS[name] is None:
            _status[name] = (True, "pure torch reference, runs anywhere")
            return _status[name]
        try:
            mod = importlib.import_module(BACKENDS[name], __package__)
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


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device) -> str:
    """The backend that will run on `device` for the requested name."""
    device = torch.device(device)
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        ok, why = backend_status(preferred)
        if ok:
            return preferred
        if preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            warnings.warn(f"speed_fast: {preferred} backend unavailable ({why}); using the torch reference",
                          stacklevel=3)
        return "torch"
    ok, why = backend_status(backend)
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {why}")
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' needs CPU tensors, got device {device}")
    return backend


def module(name: str):
    """The loaded module of an available kernel backend (cpp or triton)."""
    ok, why = backend_status(name)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {why}")
    return _loaded[name]
