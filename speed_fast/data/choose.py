"""Which latent loader reads a file: FFCV's compiled pipeline (LatentLoader) or numpy memory maps
(MemmapLoader). Both give the same batches; "auto" takes FFCV when it imports, else the memory map."""

from __future__ import annotations

import sys

LOADERS = ("auto", "ffcv", "memmap")
_announced = False


def ffcv_status() -> tuple[bool, str]:
    """(whether FFCV and numba import here, the reason when not)."""
    from .latents import keep_torch_threads

    try:
        with keep_torch_threads():
            import ffcv.loader  # noqa: F401
            import numba  # noqa: F401
    except Exception as exc:  # ImportError, or a broken compiled extension (OSError, ...)
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def resolve_loader(name: str) -> tuple[str, str | None]:
    """("ffcv" or "memmap", a one-line note when "auto" fell back to the memory map, else None).
    Raises ValueError for an unknown name, and for "ffcv" when FFCV does not import (naming why)."""
    if name not in LOADERS:
        raise ValueError(f"loader must be one of {list(LOADERS)}, got {name!r}")
    if name == "memmap":
        return "memmap", None
    ok, why = ffcv_status()
    if ok:
        return "ffcv", None
    if name == "ffcv":
        raise ValueError(f"loader 'ffcv' asked for, but FFCV does not import here ({why}); "
                         "use --loader memmap (the same batches, read with numpy) or install the ffcv extra")
    return "memmap", f"FFCV is not importable ({why}): the memmap loader reads the data (same batches)"


def open_loader(path, batch_size: int, *, loader: str = "auto", **kwargs):
    """A LatentLoader or MemmapLoader over `path` (keyword arguments as LatentLoader's). With "auto",
    a fallback to the memory map is said once per process on stderr."""
    global _announced
    which, note = resolve_loader(loader)
    if note and not _announced:
        print(f"[speed_fast] {note}", file=sys.stderr, flush=True)
        _announced = True
    if which == "ffcv":
        from .loader import LatentLoader

        return LatentLoader(path, batch_size, **kwargs)
    from .memmap_loader import MemmapLoader

    kwargs.pop("os_cache", None)
    kwargs.pop("timeout_s", None)
    return MemmapLoader(path, batch_size, **kwargs)
