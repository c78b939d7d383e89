"""The Inception weights on disk: where they are looked for, and their one download, checked.

    resolve_inception(path=None)  -> Path of a usable inception-2015-12-05.pt

Resolution, in order:
* an explicit path (`--inception PATH`) or `$SPEED_FAST_INCEPTION`: used as it is (any TorchScript
  module with the same call signature works there), never downloaded, never hash-checked; a
  missing file is one line naming it;
* else the cache (`speed_fast.paths.cached_inception_path()`): a file there must have the pinned
  SHA-256 (`INCEPTION_SHA256`, the file at `INCEPTION_URL`); when it is absent it is downloaded
  once, unless offline (`$SPEED_FAST_OFFLINE` or the Hugging Face hub's `$HF_HUB_OFFLINE` set to
  1/true/yes/on), which gives one line saying where to put the file.

A download streams into a temporary file next to the target (`speed_fast.atomic.temporary_name`),
hashing as it goes; it is renamed into place only when the byte count matches the server's
Content-Length (when given) and the SHA-256 matches the pin; otherwise the temporary file is
removed and the error names what differed (an interrupted transfer, or the two hashes). So a
partial or foreign file is never left where the next run would load it.

The pin: SHA-256 f58cb9b6...e958f4 of the 95,607,719-byte file NVIDIA publishes for StyleGAN2-ADA's
metrics, as pinned for the same URL by k-diffusion (crowsonkb/k-diffusion,
`k_diffusion/evaluation.py`) and by several other public evaluation scripts. It could not be
recomputed here (this machine cannot reach that server).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from .. import paths
from ..atomic import temporary_name

INCEPTION_FILENAME = paths.INCEPTION_FILENAME
INCEPTION_ENV = paths.INCEPTION_ENV
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
OFFLINE_ENVS = ("SPEED_FAST_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
_CHUNK = 1 << 20


class InceptionWeightsMissing(FileNotFoundError, ValueError):
    """The Inception file is absent and cannot be fetched (a ValueError too, so the CLI prints one line)."""


def offline() -> bool:
    """True when $SPEED_FAST_OFFLINE or $HF_HUB_OFFLINE says not to use the network."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENVS)


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _where_to_put(path: Path) -> str:
    return (f"fetch {INCEPTION_URL} once (e.g. `curl -L -o {path} <that URL>`), then pass its path "
            f"(--inception PATH), set ${INCEPTION_ENV}, or place it at {paths.cached_inception_path()}")


def download(url: str, dest, sha256: str, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest` atomically, refusing it unless it is whole and hashes to `sha256`.

    ValueError (nothing left at `dest`, no temporary file left) on a network error, an interrupted
    transfer or a hash mismatch."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(str(dest))
    h, received, expected = hashlib.sha256(), 0, None
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except http.client.HTTPException as exc:  # IncompleteRead: the server closed mid-body
            raise ValueError(f"download of {url} interrupted after {received:,} bytes ({type(exc).__name__}); "
                             f"nothing was kept at {dest}") from None
        except (OSError, ValueError) as exc:  # URLError (no route, refused, HTTP 404 ...) is an OSError
            reason = getattr(exc, "reason", None) or exc
            raise ValueError(f"could not download {url} ({type(exc).__name__}: {reason}); nothing was kept at "
                             f"{dest}") from None
        if expected is not None and received != expected:
            raise ValueError(f"download of {url} interrupted: {received:,} of {expected:,} bytes; nothing was kept "
                             f"at {dest}")
        got = h.hexdigest()
        if got != sha256:
            raise ValueError(f"{url} has SHA-256 {got}, expected {sha256}; the file was refused and not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_inception(path=None, *, url: str | None = None, sha256: str | None = None) -> Path:
    """The Inception file to load (see the module docstring): an explicit path or $SPEED_FAST_INCEPTION
    as it is, else the cache's copy, checked against `sha256` and downloaded from `url` when absent
    (default: INCEPTION_SHA256 and INCEPTION_URL, read when called)."""
    url = INCEPTION_URL if url is None else url
    sha256 = INCEPTION_SHA256 if sha256 is None else sha256
    explicit = Path(path) if path is not None else (Path(os.environ[INCEPTION_ENV])
                                                      if os.environ.get(INCEPTION_ENV) else None)
    if explicit is not None:
        if not explicit.is_file():
            raise InceptionWeightsMissing(
                f"Inception weights not found at {explicit}. speed_fast never downloads to an explicit path "
                f"(--inception, ${INCEPTION_ENV}): {_where_to_put(explicit)}.")
        return explicit
    cached = paths.cached_inception_path()
    if cached.is_file():
        got = sha256_of(cached)
        if got != sha256:
            raise ValueError(f"{cached} has SHA-256 {got}, expected {sha256} (the file at {url}); remove it to "
                             f"download it again, or pass another network with --inception PATH")
        return cached
    if offline():
        names = " / ".join(f"${n}" for n in OFFLINE_ENVS)
        raise InceptionWeightsMissing(
            f"Inception weights not found at {cached} and offline ({names} set): {_where_to_put(cached)}.")
    return download(url, cached, sha256)
