"""The Inception network of FID, sFID and the Inception Score: StyleGAN2-ADA's TorchScript
`inception-2015-12-05.pt` (NVIDIA's translation of TensorFlow's 2015-12-05 graph, the one ADM's
evaluator runs; also clean-fid's).

What the file does, read from its published TorchScript code (`net.code`, as transcribed in
public ports of it): `forward(img, return_features=False, use_fp16=False, no_output_bias=False)`
takes uint8-valued [N, 3, H, W], resizes to 299x299 with `affine_grid` + `grid_sample`
(bilinear, border padding, align_corners=False, the grid shifted by 1/W - 1/299 and 1/H - 1/299
so that it samples where TensorFlow's old ResizeBilinear samples), maps x to (x - 128) / 128,
runs `self.layers` (children conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed,
mixed_1 ... mixed_10, pool2), reshapes to [N, 2048] (pool_3) and returns that when
`return_features`; otherwise softmax(features @ output.weight^T (+ output.bias unless
`no_output_bias`)) over 1008 classes. ADM's IS uses the logits MatMul without the bias, i.e.
`no_output_bias=True`.

`InceptionNet(path).extract(uint8 images)` gives, from one pass:
* `pool`: [B, 2048] pool_3 features (FID, precision/recall, and the IS logits `pool @ W^T`);
* `spatial`: [B, 2023] sFID features, TensorFlow's `mixed_6/conv:0` (the 1x1 branch of mixed_6
  after its batch norm and ReLU: `layers.mixed_6.conv` here), first 7 of 192 channels of the 17x17
  map, flattened in TensorFlow's (H, W, C) order as ADM's evaluator flattens it (the order matters
  only against stored `mu_s`/`sigma_s`; a Fréchet distance is invariant to it). They come from
  running the layers one by one with the module's own resize and normalisation replicated; the
  first batch checks that this path's pool features equal the module's own `forward`, and sFID
  is reported unavailable (with the reason) when they do not, or when the module lacks the
  `layers.mixed_6.conv` child (as the small test networks built without it).

How sure: the layer names, the resize and the normalisation are the module's code as published,
and the first-batch check compares against the module's own forward, so pool features and the
input to `mixed_6.conv` are the module's; that `layers.mixed_6.conv` is TensorFlow's
`mixed_6/conv` rests on the translation keeping TensorFlow's scope names (EDM2's and other public
sFID code read the same child). This machine cannot fetch the real file, so no figure has been
compared with ADM's TensorFlow output here.

Precision: features are computed in full float32 (`ieee_fp32` turns off the TF32 that torch
enables for cuDNN convolutions by default on Ampere and later GPUs), as ADM's and StyleGAN2-ADA's
metrics are.

Loading: `load_inception(path)` loads a local file; `InceptionNet(path=None)` and
`InceptionFeatures(path=None)` resolve the file first (`speed_fast.evaluation.download`:
explicit path / $SPEED_FAST_INCEPTION as is, else the cache, downloaded once and checked against
the pinned SHA-256). Any TorchScript module with the same call signature works (the tests use
small random ones). torchvision is not needed.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import paths
from ..sampling import to_uint8
from .download import (INCEPTION_ENV, INCEPTION_FILENAME, INCEPTION_SHA256, INCEPTION_URL, InceptionWeightsMissing,
                       _where_to_put, resolve_inception, sha256_of)

__all__ = ["INCEPTION_ENV", "INCEPTION_FILENAME", "INCEPTION_SHA256", "INCEPTION_URL", "InceptionFeatures",
           "InceptionNet", "InceptionWeightsMissing", "LAYER_NAMES", "default_inception_path", "load_inception"]

#: The children of the module's `layers`, in the order its forward runs them.
LAYER_NAMES = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed") + tuple(
    f"mixed_{i}" for i in range(1, 11)) + ("pool2",)
SPATIAL_BLOCK = "mixed_6"   # sFID reads this block's `conv` child (TensorFlow's mixed_6/conv)
SPATIAL_CHANNELS = 7        # ADM keeps the first 7 channels: 7 x 17 x 17 = 2023 dims
INPUT_SIZE = 299


def default_inception_path() -> Path:
    """Where a local Inception file is looked for: $SPEED_FAST_INCEPTION, else the speed_fast cache."""
    return paths.inception_path()


def load_inception(path=None, device="cpu"):
    """The TorchScript network from a local file (never downloaded; see `InceptionNet` for that)."""
    path = Path(path) if path is not None else default_inception_path()
    if not path.is_file():
        raise InceptionWeightsMissing(f"Inception weights not found at {path}: {_where_to_put(path)}.")
    with warnings.catch_warnings():
        # torch.jit is deprecated in recent torch but remains the format this file ships in.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            net = torch.jit.load(str(path), map_location=torch.device(device))
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a TorchScript module ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}); expected {INCEPTION_FILENAME}") from None
    return net.eval()


def resize_and_normalise(images: torch.Tensor) -> torch.Tensor:
    """The module's input stage: uint8-valued [B, 3, H, W] -> float32 [B, 3, 299, 299] in about [-1, 1]
    (TensorFlow-style bilinear resize by a shifted sampling grid, then (x - 128) / 128)."""
    x = images.to(torch.float32)
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / INPUT_SIZE  # sample where TF's ResizeBilinear (half_pixel off) samples
    theta[:, 1, 2] = 1.0 / h - 1.0 / INPUT_SIZE
    grid = F.affine_grid(theta, [b, c, INPUT_SIZE, INPUT_SIZE], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128.0) / 128.0


@contextlib.contextmanager
def ieee_fp32():
    """Full-precision float32 for cuDNN convolutions and CUDA matmuls inside the block, restored after.

    torch runs float32 convolutions in TF32 on Ampere and later GPUs by default (cuDNN's
    allow_tf32 is True), which rounds inputs to a 10-bit mantissa: ADM's and StyleGAN2-ADA's
    metrics run in full float32, so features here do too. No effect on the CPU."""
    owners = [o for o in (getattr(torch.backends.cudnn, "conv", None), getattr(torch.backends.cuda, "matmul", None))
              if o is not None and hasattr(o, "fp32_precision")]
    if len(owners) == 2:  # torch >= 2.9: the per-backend precision settings
        saved = [o.fp32_precision for o in owners]
        try:
            for o in owners:
                o.fp32_precision = "ieee"
            yield
        finally:
            for o, value in zip(owners, saved):
                o.fp32_precision = value
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionNet:
    """The loaded network and what it can give: pool features always, sFID's spatial features and
    IS logits when the module exposes them (see the module docstring)."""

    def __init__(self, path=None, device="cpu", *, url: str | None = None, sha256: str | None = None):
        self.path = resolve_inception(path, url=url, sha256=sha256)
        self.device = torch.device(device)
        self.net = load_inception(self.path, self.device)
        self.spatial_unavailable = self._spatial_reason()
        self._checked = self.spatial_unavailable is not None
        weight = getattr(getattr(self.net, "output", None), "weight", None)
        self.logit_weight = weight.detach().to(torch.float64).cpu() if isinstance(weight, torch.Tensor) else None
        self.is_unavailable = (None if self.logit_weight is not None else
                               "the network has no output.weight (the 1008-class logits of the Inception Score)")

    def identity(self) -> str:
        """SHA-256 of the network file (part of the reference-statistics cache key)."""
        if not hasattr(self, "_identity"):
            self._identity = sha256_of(self.path)
        return self._identity

    def _spatial_reason(self) -> str | None:
        layers = getattr(self.net, "layers", None)
        missing = [n for n in LAYER_NAMES if layers is None or not hasattr(layers, n)]
        if missing:
            return f"the network has no layers.{missing[0]} (it is not inception-2015-12-05.pt's structure)"
        if not hasattr(getattr(layers, SPATIAL_BLOCK), "conv"):
            return f"the network has no layers.{SPATIAL_BLOCK}.conv (TensorFlow's mixed_6/conv)"
        return None

    def _layer_by_layer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.net.layers
        h = resize_and_normalise(x)
        spatial = None
        for name in LAYER_NAMES:
            block = getattr(layers, name)
            if name == SPATIAL_BLOCK:
                s = block.conv(h)[:, :SPATIAL_CHANNELS]                 # (B, 7, 17, 17)
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # (B, 17 * 17 * 7), TF's HWC order
            h = block(h)
        return h.reshape(h.shape[0], -1).float(), spatial.float()

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pool float32 [B, D], spatial float32 [B, 2023] or None) of uint8 images [B, 1 or 3, H, W], on the CPU,
        computed in full float32 (`ieee_fp32`)."""
        with ieee_fp32():
            return self._extract(images)

    def _extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images if images.dtype == torch.uint8 else to_uint8(images)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = x.to(self.device)
        if self.spatial_unavailable is not None:
            return self.net(x, return_features=True).float().cpu(), None
        pool, spatial = self._layer_by_layer(x)
        if not self._checked:  # once: the replicated path must give the module's own pool features
            own = self.net(x, return_features=True).float()
            err = float((own - pool).abs().max())
            scale = float(own.abs().max().clamp_min(1.0))
            self._checked = True
            if not err <= 1e-4 * scale:
                self.spatial_unavailable = (f"the layer-by-layer pass differs from the module's forward by {err:.3g} "
                                            f"(max |feature| {scale:.3g}), so mixed_6/conv cannot be trusted")
                return own.cpu(), None
        return pool.cpu(), spatial.cpu()

    def probabilities(self, pool) -> torch.Tensor:
        """softmax(pool @ W^T) in float64: the module's no_output_bias=True output (ADM's IS), from pool features."""
        if self.logit_weight is None:
            raise ValueError(self.is_unavailable)
        logits = torch.as_tensor(pool, dtype=torch.float64) @ self.logit_weight.T  # (N, 1008)
        return torch.softmax(logits, dim=1)


class InceptionFeatures:
    """FID features as a feature callable (images in [-1, 1] or uint8 -> float64 [N, 2048]); the key is "fid"."""

    key = "fid"

    def __init__(self, path=None, device="cpu", batch_size: int = 64):
        self.inception = InceptionNet(path, device)
        self.net, self.device = self.inception.net, self.inception.device
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
            with ieee_fp32():
                out.append(self.net(batch.to(self.device), return_features=True).double().cpu())
        return torch.cat(out)
