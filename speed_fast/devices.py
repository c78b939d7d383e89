"""Device resolution: the one place a user's device string becomes a torch.device.

`resolve_device(spec)`: None or "auto" -> CUDA when this machine has it, else the CPU; "cpu",
"cuda" or "cuda:N" of a GPU this machine has; anything else is a ValueError naming the flag, the
value and what is accepted. Used by `speed-fast sample`, `speed-fast eval` and `speed-fast encode`.
"""

from __future__ import annotations

import torch


def resolve_device(spec: str | None = None, flag: str = "--device") -> torch.device:
    """`spec` as a torch.device (see the module docstring); `flag` names it in errors."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec} requested but CUDA is not available")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
