"""FID's feature network, loaded from a local file and never downloaded.

* `InceptionFeatures`: FID's 2048-d pool features from the TorchScript Inception-v3 that
  StyleGAN2-ADA and clean-fid use, `inception-2015-12-05.pt` (a translation of TensorFlow's
  2015-12-05 graph; it takes uint8 [N, 3, H, W] and resizes internally). It is never
  downloaded at run time: put the file at `$SPEED_FAST_INCEPTION`, or at
  `<cache>/inception-2015-12-05.pt` (speed_fast.paths), or pass its path. It is called as
  `net(images_uint8, return_features=True) -> [N, 2048]`; any TorchScript module with that
  signature works (the tests use a small random one). torchvision is not needed. The key is "fid".
"""

from __future__ import annotations

import operator
import warnings
from pathlib import Path

import torch

from .. import paths
from ..sampling import to_uint8

INCEPTION_FILENAME = paths.INCEPTION_FILENAME
INCEPTION_ENV = paths.INCEPTION_ENV
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class InceptionWeightsMissing(FileNotFoundError, ValueError):
    """The local Inception file is absent (a ValueError too, so the CLI prints it as a clean error)."""


def default_inception_path() -> Path:
    """Where InceptionFeatures looks when no path is given: $SPEED_FAST_INCEPTION, else the speed_fast cache."""
    return paths.inception_path()


def load_inception(path=None, device="cpu"):
    """The TorchScript feature network from a local file; a clear error when it is missing."""
    path = Path(path) if path is not None else default_inception_path()
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights not found at {path}. FID never downloads at run time: fetch "
            f"{INCEPTION_URL} once (e.g. `curl -L -o {path} <that URL>`), then pass its path "
            f"(--inception PATH), set ${INCEPTION_ENV}, or place it at "
            f"{paths.cached_inception_path()}.")
    with warnings.catch_warnings():
        # torch.jit is deprecated in recent torch but remains the format this file ships in.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            net = torch.jit.load(str(path), map_location=torch.device(device))
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a TorchScript module ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}); expected {INCEPTION_FILENAME}") from None
    return net.eval()


class InceptionFeatures:
    """FID features: uint8 RGB images through the local TorchScript Inception (see the module docstring)."""

    key = "fid"

    def __init__(self, path=None, device="cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.net = load_inception(path, self.device)
        self.batch_size = operator.index(batch_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [N, 1 or 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size]
            batch = batch if batch.dtype == torch.uint8 else to_uint8(batch)
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            out.append(self.net(batch.to(self.device), return_features=True).double().cpu())
        return torch.cat(out)
