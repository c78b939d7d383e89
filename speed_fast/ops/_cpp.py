"""The cpp backend: C++/OpenMP CPU kernels of the fused ops (sources in `csrc/`).

The sources ship inside the package (`speed_fast.csrc`, editable or wheel install)
and are compiled with torch's extension API on first use, into a cache directory
keyed by the sources, their location, flags, torch and Python versions:

    $SPEED_FAST_BUILD_DIR, else $TORCH_EXTENSIONS_DIR/speed_fast_cpu_<key>,
    else <cache>/speed_fast_cpu_<key>   (<cache>: $SPEED_FAST_CACHE or ~/.cache/speed_fast, speed_fast.paths)

Later processes only load the cached library (a no-op ninja check). The library
registers torch custom ops `torch.ops.speed_fast.cpp_*` (C++ kernels, Python fake
implementations below), so torch.compile traces through them and DeepSpeed sees
ordinary tensor ops. A failed build is never hidden: `available()` returns False
with the compiler's first error, `speed-fast env` prints it, and requesting
backend="cpp" raises `BackendUnavailable`.

Kernels exist for AVX-512, AVX2 and plain x86-64/other CPUs, chosen at run time
(`cpu_isa()`); all three produce bit-identical noise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

from .. import paths
from ..layout import contiguous_samples
from ..rng import seed_bits

EXTENSION = "speed_fast_cpu"
SOURCES = (
    "dispatch.cpp",
    "eps_cache.cpp",
    "isa_scalar.cpp",
    "isa_avx2.cpp",
    "isa_avx512.cpp",
    "sample_timesteps.cpp",
    "sample_and_noise.cpp",
    "weighted_mse.cpp",
)
HEADERS = ("kernels.h", "fused_impl.h", "ops_common.h", "eps_cache.h")
# No -march: the SIMD code paths carry their own target attributes and are chosen at run
# time. -ffp-contract=off keeps a * x + b * y as the reference rounds it (explicit fmas stay).
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)

_state: dict[str, object] = {}


def _source_dir() -> Path:
    return Path(str(importlib.resources.files("speed_fast.csrc")))


def build_dir() -> Path:
    """Where the compiled library is cached (see the module docstring)."""
    if os.environ.get("SPEED_FAST_BUILD_DIR"):
        return Path(os.environ["SPEED_FAST_BUILD_DIR"])
    src = _source_dir()
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    # The checkout's own path too: torch's build.ninja names the sources by absolute path, so two
    # checkouts sharing one build directory would rebuild it in turn at every first use.
    h.update(str(src.resolve()).encode())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    return Path(paths.cpp_build_root()) / f"{EXTENSION}_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(directory: Path):
    """An flock (released by the kernel if the holder dies), so concurrent first uses build once."""
    with open(directory / "speed_fast_build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            # Under our lock nobody else is building: a lock file of torch's own baton is a
            # leftover of a killed build, and torch would wait on it forever.
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile_error_summary(exc: BaseException, limit: int = 4) -> str:
    """The compiler's own complaints (not ninja's command lines) from a failed build."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    wanted = re.compile(r"error|fatal|not found|no such file|undefined reference", re.IGNORECASE)
    complaints = [ln for ln in lines[1:] if wanted.search(ln) and not ln.startswith("[") and " -c " not in ln]
    picked = [ln[:200] for ln in list(dict.fromkeys(complaints or lines))[:limit]]
    return f"{type(exc).__name__}: " + " | ".join(picked)


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile / FakeTensor can trace the C++ ops."""

    @torch.library.register_fake("speed_fast::cpp_sample_timesteps")
    def _(prob, alias, n, seed, step, offset):
        return prob.new_empty((n,), dtype=torch.int64)

    @torch.library.register_fake("speed_fast::cpp_sample_and_noise")
    def _(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset):
        return x0.new_empty((x0.shape[0],), dtype=torch.int64), x0.new_empty(x0.shape)

    @torch.library.register_fake("speed_fast::cpp_add_noise")
    def _(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset):
        return x0.new_empty(x0.shape)

    @torch.library.register_fake("speed_fast::cpp_weighted_mse_fwd")
    def _(pred, t, weights, seed, step, offset):
        f32 = dict(dtype=torch.float32, device=pred.device)
        return pred.new_empty((), **f32), pred.new_empty(pred.shape), pred.new_empty((pred.shape[0],), **f32)

    @torch.library.register_fake("speed_fast::cpp_normal")
    def _(numel, seed, step, first_element):
        return torch.empty((numel,), dtype=torch.float32)


def load() -> None:
    """Build (or find the cached build of) the C++ library and register its ops; raises on failure."""
    if "loaded" in _state:
        return
    if "error" in _state:
        raise _state["error"]
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when .venv/bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        src = _source_dir()
        with _build_lock(directory):
            cpp_extension.load(
                name=EXTENSION,
                sources=[str(src / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                extra_include_paths=[str(src)],
                build_directory=str(directory),
                is_python_module=False,
                verbose=os.environ.get("SPEED_FAST_VERBOSE_BUILD", "0") == "1",
            )
        _register_fakes()
    except Exception as exc:
        _state["error"] = exc
        raise
    _state["loaded"] = True
    _state["dir"] = str(directory)


def available() -> tuple[bool, str]:
    try:
        load()
    except Exception as exc:  # reported, never hidden: see speed_fast.ops.backend_status
        return False, f"C++ extension failed to build or load: {_compile_error_summary(exc)}"
    return True, f"C++/OpenMP kernels ({cpu_isa()}, {torch.get_num_threads()} threads), built in {_state['dir']}"


def cpu_isa(request: str = "") -> str:
    """The SIMD kernel table in use ("avx512" | "avx2" | "scalar"); a non-empty request
    ("auto" or one of those) selects it first (ValueError if this CPU cannot run it)."""
    load()
    return torch.ops.speed_fast.cpp_cpu_isa(request)


def supported_isas() -> list[str]:
    """The kernel tables this CPU can run, best first."""
    current = cpu_isa()
    names = []
    for name in ("avx512", "avx2", "scalar"):
        try:
            cpu_isa(name)
        except ValueError:
            continue
        names.append(name)
    cpu_isa(current)
    return names


@contextlib.contextmanager
def use_isa(name: str):
    """Run the block with one kernel table (to test or time each instruction set)."""
    previous = cpu_isa()
    cpu_isa(name)
    try:
        yield
    finally:
        cpu_isa(previous)


@contextlib.contextmanager
def keep_noise(enabled: bool = True):
    """Within the block, sample_and_noise keeps (or does not keep) its float32 noise for the
    weighted_mse of the same step (csrc/eps_cache.h); the values are identical either way."""
    load()
    previous = torch.ops.speed_fast.cpp_keep_eps(-1)
    torch.ops.speed_fast.cpp_keep_eps(1 if enabled else 0)
    try:
        yield
    finally:
        torch.ops.speed_fast.cpp_keep_eps(previous)


def eps_cache_hits() -> int:
    """How many weighted_mse calls in this process read noise kept by sample_and_noise."""
    load()
    return torch.ops.speed_fast.cpp_eps_cache_hits()


def normal(numel: int, seed: int, step: int, first_element: int = 0) -> torch.Tensor:
    """float32 [numel]: the same noise as `speed_fast.rng.normal_ref`, from the SIMD generator."""
    load()
    return torch.ops.speed_fast.cpp_normal(numel, seed_bits(seed), step, first_element)


# Backend interface (see speed_fast/ops/backends.py).


def sample_timesteps(prob, alias, n, seed, step, offset=0):
    load()
    return torch.ops.speed_fast.cpp_sample_timesteps(prob.contiguous(), alias.contiguous(), n, seed_bits(seed), step,
                                                     offset)


def add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    load()
    return torch.ops.speed_fast.cpp_add_noise(contiguous_samples(x0), t.contiguous(), sqrt_ab.contiguous(),
                                              sqrt_1mab.contiguous(), seed_bits(seed), step, offset)


def sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step, offset=0):
    load()
    return torch.ops.speed_fast.cpp_sample_and_noise(contiguous_samples(x0), prob.contiguous(), alias.contiguous(),
                                                     sqrt_ab.contiguous(), sqrt_1mab.contiguous(), seed_bits(seed),
                                                     step, offset)


def weighted_mse_fwd(pred, t, weights, seed, step, offset=0):
    load()
    return torch.ops.speed_fast.cpp_weighted_mse_fwd(contiguous_samples(pred), t.contiguous(), weights.contiguous(),
                                                     seed_bits(seed), step, offset)
