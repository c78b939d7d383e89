"""Where speed_fast keeps its files on disk: the one owner of the cache directory.

    cache_dir()        $SPEED_FAST_CACHE, else ~/.cache/speed_fast
    inception_path()   $SPEED_FAST_INCEPTION, else <cache>/inception-2015-12-05.pt
    cpp_build_root()   $TORCH_EXTENSIONS_DIR, else <cache>   (the C++ library goes in a keyed folder below)
    reference_cache_dir()  <cache>/eval-references   (reference features of `speed-fast eval`, by content hash)

Everything that caches (the digits .beton, the verified-file list of latent files, the Inception
weights' default location and download, eval's reference features, the C++ build) asks here, so one variable moves all of it. A leaf:
it imports nothing from speed_fast.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SPEED_FAST_CACHE"
INCEPTION_ENV = "SPEED_FAST_INCEPTION"
INCEPTION_FILENAME = "inception-2015-12-05.pt"


def cache_dir() -> str:
    """$SPEED_FAST_CACHE, else ~/.cache/speed_fast (not created here)."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "speed_fast")


def cached_inception_path() -> Path:
    """The FID network's place in the cache (where `inception_path` looks without $SPEED_FAST_INCEPTION)."""
    return Path(cache_dir()) / INCEPTION_FILENAME


def inception_path() -> Path:
    """$SPEED_FAST_INCEPTION, else `cached_inception_path()`."""
    env = os.environ.get(INCEPTION_ENV)
    return Path(env) if env else cached_inception_path()


def cpp_build_root() -> str:
    """The folder under which the C++ kernels are built: $TORCH_EXTENSIONS_DIR (torch's own
    variable for extension builds), else the speed_fast cache."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or cache_dir()


def reference_cache_dir() -> Path:
    """Where `speed-fast eval` keeps reference-set features, by content hash (<cache>/eval-references)."""
    return Path(cache_dir()) / "eval-references"
