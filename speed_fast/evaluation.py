"""Sample quality: the Fréchet distance, FID with local Inception weights, and training-time evaluation.

Fréchet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al. 2017):

    d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)

S1 S2 is not symmetric, and scipy's sqrtm of it can return complex parts or fail when S1 is
singular (fewer samples than dimensions). Here tr (S1 S2)^(1/2) is the sum of square roots of
the eigenvalues of S1 S2, which are those of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2)
(AB and BA share eigenvalues); both square roots come from `eigh` in float64 with eigenvalues
at rounding level (< d eps max) set to 0. This is exact for singular covariances and needs no eps offset.

Features:
* `RawFeatures`: the flattened data itself (pixels or latents), for small sets such as the
  digits default (64 dims). Above `max_dim` dims the data are projected on a fixed random
  Gaussian matrix (seeded, [D, max_dim], scaled 1/sqrt(max_dim)) so the covariance stays
  well-estimated from a few hundred samples; the metric is then "Fréchet distance of raw data
  under a fixed random projection", comparable only between runs using the same projection.
  The key is "fd_raw".
* `InceptionFeatures`: FID's 2048-d pool features from the TorchScript Inception-v3 that
  StyleGAN2-ADA and clean-fid use, `inception-2015-12-05.pt` (a translation of TensorFlow's
  2015-12-05 graph; it takes uint8 [N, 3, H, W] and resizes internally). It is never
  downloaded at run time: put the file at `$SPEED_FAST_INCEPTION`, or at
  `~/.cache/speed_fast/inception-2015-12-05.pt`, or pass its path. It is called as
  `net(images_uint8, return_features=True) -> [N, 2048]`; any TorchScript module with that
  signature works (the tests use a small random one). torchvision is not needed. The key is "fid".

`TrainingEvaluator` samples a fixed-seed set during training and reports its distance to the
reference set; `plot_quality` draws quality vs step from a run's metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import operator
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .sampling import sample, to_uint8
from .schedule import NoiseSchedule

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_ENV = "SPEED_FAST_INCEPTION"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
QUALITY_KEYS = ("fid", "fd_raw")


def _as_vector(name: str, mu) -> np.ndarray:
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {mu.shape}")
    if not np.isfinite(mu).all():
        raise ValueError(f"{name} has non-finite entries")
    return mu


def _as_covariance(name: str, sigma, d: int) -> np.ndarray:
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if sigma.shape != (d, d):
        raise ValueError(f"{name} must be [{d}, {d}], got shape {sigma.shape}")
    if not np.isfinite(sigma).all():
        raise ValueError(f"{name} has non-finite entries")
    asym = np.abs(sigma - sigma.T).max()
    if asym > 1e-6 * max(1.0, np.abs(sigma).max()):
        raise ValueError(f"{name} must be symmetric, got max |S - S^T| = {asym:.3g}")
    return 0.5 * (sigma + sigma.T)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise set to 0: below d * eps * max |w| they are
    indistinguishable from 0, and their square roots (~1e-8) would otherwise add up."""
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2, via the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    return float(np.sqrt(_clip_eigenvalues(w)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    Covariances must be symmetric PSD (singular is fine); the result is >= 0 up to rounding."""
    mu1, mu2 = _as_vector("mu1", mu1), _as_vector("mu2", mu2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same length, got {mu1.shape[0]} and {mu2.shape[0]}")
    d = mu1.shape[0]
    sigma1, sigma2 = _as_covariance("sigma1", sigma1, d), _as_covariance("sigma2", sigma2, d)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # Rounding can leave a tiny negative value for identical Gaussians; a distance is >= 0.
    return float(max(value, 0.0))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of features [N, D] (N >= 2; unbiased covariance, as FID)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features have non-finite entries (did sampling diverge?)")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


# ---------------------------------------------------------------------------
# Feature extractors: images [N, C, H, W] float in [-1, 1] (or latents) -> float64 [N, D]
# ---------------------------------------------------------------------------


class RawFeatures:
    """Flattened data, randomly projected to `max_dim` dims when larger (see the module docstring)."""

    key = "fd_raw"

    def __init__(self, max_dim: int = 512, seed: int = 0):
        max_dim = operator.index(max_dim)
        if max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {max_dim}")
        self.max_dim, self.seed = max_dim, operator.index(seed)
        self._proj: torch.Tensor | None = None

    def projection(self, dim: int) -> torch.Tensor | None:
        """The fixed [dim, max_dim] projection (None when dim <= max_dim)."""
        if dim <= self.max_dim:
            return None
        if self._proj is None or self._proj.shape[0] != dim:
            g = torch.Generator().manual_seed(self.seed)
            self._proj = torch.randn(dim, self.max_dim, generator=g, dtype=torch.float64) / math.sqrt(self.max_dim)
        return self._proj

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.detach().cpu().double().reshape(images.shape[0], -1)  # (N, D)
        proj = self.projection(flat.shape[1])
        return flat if proj is None else flat @ proj


class InceptionWeightsMissing(FileNotFoundError, ValueError):
    """The local Inception file is absent (a ValueError too, so the CLI prints it as a clean error)."""


def default_inception_path() -> Path:
    """Where InceptionFeatures looks when no path is given: $SPEED_FAST_INCEPTION, else the user cache."""
    env = os.environ.get(INCEPTION_ENV)
    return Path(env) if env else Path.home() / ".cache" / "speed_fast" / INCEPTION_FILENAME


def load_inception(path=None, device="cpu"):
    """The TorchScript feature network from a local file; a clear error when it is missing."""
    path = Path(path) if path is not None else default_inception_path()
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights not found at {path}. FID never downloads at run time: fetch "
            f"{INCEPTION_URL} once (e.g. `curl -L -o {path} <that URL>`), then pass its path "
            f"(--inception PATH), set ${INCEPTION_ENV}, or place it at "
            f"{Path.home() / '.cache' / 'speed_fast' / INCEPTION_FILENAME}.")
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


def make_features(kind: str = "raw", *, inception_path=None, device="cpu", max_dim: int = 512, seed: int = 0):
    """"raw" -> RawFeatures(max_dim, seed); "inception" -> InceptionFeatures(inception_path, device)."""
    if kind == "raw":
        return RawFeatures(max_dim=max_dim, seed=seed)
    if kind == "inception":
        return InceptionFeatures(inception_path, device=device)
    raise ValueError(f"features must be 'raw' or 'inception', got {kind!r}")


def features_of(data, features, batch_size: int = 1024) -> torch.Tensor:
    """features(data) for data [N, C, H, W] (tensor or array), computed in batches: float64 [N, D]."""
    data = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    return torch.cat([features(data[s:s + batch_size]) for s in range(0, data.shape[0], batch_size)])


def feature_stats(data, features, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features(data) for data [N, C, H, W] (tensor or array), computed in batches."""
    return gaussian_stats(features_of(data, features, batch_size))


def frechet_between(generated, reference, features=None) -> float:
    """Fréchet distance between two sets of images/latents [N, C, H, W] under `features` (default raw)."""
    features = RawFeatures() if features is None else features
    return frechet_distance(*feature_stats(generated, features), *feature_stats(reference, features))


ARRAY_KEYS = ("images", "latents", "samples", "x", "arr_0")


def load_array(path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data float32 [N, C, H, W], labels int64 [N] or None) from a .npy or .npz file.

    uint8 arrays are images in [0, 255] and are mapped to [-1, 1]; float arrays are taken as they
    are (images in [-1, 1] or latents). [N, H, W] gets a channel axis; [N, H, W, 1 or 3] (NHWC)
    is transposed. An .npz is read from the first of the keys images, latents, samples, x, arr_0
    it holds; labels from "labels" or "y" when present."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such array file: {path}")
    labels = None
    if path.endswith(".npz"):
        with np.load(path) as z:
            key = next((k for k in ARRAY_KEYS if k in z.files), None)
            if key is None:
                raise ValueError(f"{path} holds {z.files}; expected one of {ARRAY_KEYS}")
            arr = z[key]
            lab_key = next((k for k in ("labels", "y") if k in z.files), None)
            labels = torch.as_tensor(z[lab_key].astype(np.int64)) if lab_key else None
    elif path.endswith(".npy"):
        arr = np.load(path)
    else:
        raise ValueError(f"expected a .npy or .npz file, got {path}")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{path}: expected [N, C, H, W] (or [N, H, W], [N, H, W, C]), got shape {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype == np.uint8:
        data = torch.from_numpy(np.ascontiguousarray(arr)).float() / 127.5 - 1.0
    elif arr.dtype.kind == "f":
        data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise ValueError(f"{path}: expected uint8 images or float data, got dtype {arr.dtype}")
    if not torch.isfinite(data).all():
        raise ValueError(f"{path} has non-finite values")
    if labels is not None and labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} samples")
    return data, labels


# ---------------------------------------------------------------------------
# Training-time evaluation
# ---------------------------------------------------------------------------

#: The evaluator's sampler: DDIM over 25 respaced steps (eta 0). On pixel data the predicted x0
#: is clipped to [-1, 1] at every step: without it, eps errors at high t (amplified by
#: 1/sqrt(abar_t), ~150 at t = 960 on the linear schedule) let a few percent of an undertrained
#: model's samples diverge, and the Fréchet distance of one checkpoint then swung 8x between
#: sample seeds; with clipping it stays within a few percent (tests/test_evaluation.py).
EVAL_SAMPLER = "ddim25"
SPACES = ("pixels", "latents")


def data_space(meta: dict) -> str:
    """"pixels" or "latents" for a data file's meta: its "space" entry (top level, or under "source"
    where `write_latents(extra=...)` puts provenance) when it has one, else pixels for 1 or 3 channels
    (images in [-1, 1]) and latents otherwise (e.g. 4-channel VAE latents)."""
    source = meta.get("source")
    space = meta.get("space", source.get("space") if isinstance(source, dict) else None)
    if space is not None:
        if space not in SPACES:
            raise ValueError(f"data meta 'space' must be one of {SPACES}, got {space!r}")
        return space
    return "pixels" if int(meta["shape"][0]) in (1, 3) else "latents"


def sampler_method(steps) -> str:
    """The sampler a respacing spec names: "ddim" for "ddimN", DDPM (ancestral, learned sigma) otherwise."""
    return "ddim" if isinstance(steps, str) and steps.startswith("ddim") else "ddpm"


def eval_sampling(meta: dict, steps=EVAL_SAMPLER, clip_denoised: bool | None = None) -> dict:
    """The sampling settings of every quality evaluation (trainer's --eval-every, `speed-fast eval` of a
    run, the convergence benchmark): {"steps", "method", "clip_denoised"}. clip_denoised=None means
    clip on pixel data, not on latents (their range is not bounded)."""
    clip = data_space(meta) == "pixels" if clip_denoised is None else bool(clip_denoised)
    return {"steps": steps, "method": sampler_method(steps), "clip_denoised": clip}


class TrainingEvaluator:
    """Quality of a model during training: a fixed-seed sample set against a reference set.

    Call `evaluate(model, step)` every N steps with a bare module (not the DeepSpeed engine; the
    EMA copy when there is one). Every call draws the same initial noise and labels (same seed),
    so changes in the distance come from the model only.

        ev = TrainingEvaluator(reference=x_ref, schedule=schedule, n_samples=256, steps="ddim25")
        record = ev.evaluate(model, step)   # {"step": 1000, "fd_raw": 3.1, "eval_samples": 256, "eval_s": 0.8}
        metrics.write(json.dumps({**train_record, **record}))

    Distributed: with `world` > 1 (default: the initialised process group's size) every rank
    builds an evaluator and calls `evaluate` together, each with a full copy of the model. Rank r
    draws only its contiguous share of the set, samples `share()` (about n / world; sample i is
    the same image whatever rank draws it, see `speed_fast.sampling`; shares differ by at most one
sample), extracts their features,
    and rank 0 gathers the features and computes the distance; `evaluate` returns the record on
    rank 0 and None elsewhere. The only collective is that gather, so no rank waits in a
    collective longer than the slowest rank's share takes beyond the others' (at most one
    sampling batch) plus rank 0's distance computation; the process group's timeout is never
    approached by the sampling time itself. Only rank 0 needs `reference` (others pass None).

    reference: [N, C, H, W] real data in the model's space (pixels in [-1, 1] or latents), or a
    ready (mu, sigma) pair. features: a callable (RawFeatures by default; InceptionFeatures for
    FID, then `decode` must turn latents into images in [-1, 1]). `steps`, `method`, `eta`,
    `cfg_scale`, `seed`, `batch_size`, `num_classes`, `shape`, `learn_sigma`, `clip_denoised`
    are passed to `speed_fast.sampling.sample`. `autocast` (default: on for CUDA) samples under
    bf16 autocast (the model keeps an fp32 residual stream and the sampler computes in fp32).
    The result key is features.key ("fd_raw" or "fid").
    """

    def __init__(self, reference, schedule: NoiseSchedule, n_samples: int = 256, steps="ddim25",
                 method: str = "ddim", eta: float = 0.0, cfg_scale: float = 1.0, seed: int = 0,
                 batch_size: int = 256, num_classes: int | None = None, shape=None, learn_sigma: bool | None = None,
                 clip_denoised: bool = False, features=None, decode=None, device=None, rank: int | None = None,
                 world: int | None = None, group=None, autocast: bool | None = None):
        n_samples = operator.index(n_samples)
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 for a covariance, got {n_samples}")
        self.schedule, self.n_samples = schedule, n_samples
        self.features = RawFeatures() if features is None else features
        self.key = getattr(self.features, "key", "fd")
        self.decode, self.device = decode, device
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.group = group
        self.rank = rank if rank is not None else (torch.distributed.get_rank(group) if initialised else 0)
        self.world = world if world is not None else (torch.distributed.get_world_size(group) if initialised else 1)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world) = [0, {self.world}), got {self.rank}")
        if n_samples < self.world:
            raise ValueError(f"n_samples ({n_samples}) must be at least the number of ranks ({self.world})")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.autocast = dev.type == "cuda" if autocast is None else bool(autocast)
        self._autocast_device = dev.type
        self.ref_mu = self.ref_sigma = None
        if reference is None:
            if self.rank == 0:
                raise ValueError("reference is needed on rank 0 (it computes the distance), got None")
            if shape is None:
                raise ValueError("shape=(C, H, W) is needed when reference is None")
        elif isinstance(reference, tuple) and len(reference) == 2:
            self.ref_mu, self.ref_sigma = (np.asarray(r, dtype=np.float64) for r in reference)
        else:
            reference = torch.as_tensor(np.asarray(reference)) if not isinstance(reference, torch.Tensor) else reference
            if reference.ndim != 4:
                raise ValueError(f"reference must be [N, C, H, W] or (mu, sigma), got shape {tuple(reference.shape)}")
            if shape is None:
                shape = tuple(reference.shape[1:])
            if self.rank == 0:
                self.ref_mu, self.ref_sigma = feature_stats(reference.float(), self.features)
        self.sample_kwargs = dict(steps=steps, method=method, eta=eta, cfg_scale=cfg_scale, seed=seed,
                                  batch_size=batch_size, num_classes=num_classes, shape=shape,
                                  learn_sigma=learn_sigma, clip_denoised=clip_denoised)

    def share(self, rank: int | None = None) -> range:
        """The indices of the fixed-seed set that `rank` (default: this rank) draws: a contiguous slice."""
        rank = self.rank if rank is None else rank
        return range(rank * self.n_samples // self.world, (rank + 1) * self.n_samples // self.world)

    def samples(self, model, indices: range | None = None) -> torch.Tensor:
        """Samples `indices` (default: all) of the fixed-seed set of `model` (decoded when a decoder was given)."""
        indices = range(self.n_samples) if indices is None else indices
        with torch.autocast(self._autocast_device, dtype=torch.bfloat16, enabled=self.autocast):
            x = sample(model, self.schedule, len(indices), device=self.device, first_index=indices.start,
                       **self.sample_kwargs)
        return self.decode(x) if self.decode is not None else x

    def _gather(self, feats: torch.Tensor) -> torch.Tensor | None:
        """Every rank's features [n_r, D] concatenated in sample order on rank 0 (None elsewhere)."""
        dist = torch.distributed
        per = -(-self.n_samples // self.world)  # the largest share
        nccl = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        padded = torch.zeros(per, feats.shape[1], dtype=torch.float64, device=device)
        padded[:feats.shape[0]] = feats.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.gather(padded, parts, dst=root, group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([part[:len(self.share(r))] for r, part in enumerate(parts)]).cpu()

    def evaluate(self, model, step: int) -> dict | None:
        """{"step", key: distance, "eval_samples", "eval_s"} for `model` at training step `step`
        (collective when distributed: the record on rank 0, None on the other ranks)."""
        start = time.perf_counter()
        feats = features_of(self.samples(model, self.share()), self.features)  # (n_r, D)
        if self.world > 1:
            feats = self._gather(feats)
            if feats is None:
                return None
        mu, sigma = gaussian_stats(feats)
        value = frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)
        return {"step": int(step), self.key: value, "eval_samples": self.n_samples,
                "eval_s": time.perf_counter() - start}


def steps_to_reach(steps, values, target: float) -> float | None:
    """The first training step at which a quality curve (lower is better) reaches `target`,
    linearly interpolated between the two evaluations that bracket the crossing; None if never."""
    steps, values = [float(s) for s in steps], [float(v) for v in values]
    if len(steps) != len(values) or not steps:
        raise ValueError(f"steps and values must be non-empty and of equal length, got {len(steps)} and {len(values)}")
    for i, v in enumerate(values):
        if v <= target:
            if i == 0:
                return steps[0]
            s0, v0, s1 = steps[i - 1], values[i - 1], steps[i]
            return s0 + (v0 - target) / (v0 - v) * (s1 - s0)
    return None


def acceleration_ratio(steps, baseline, method) -> dict:
    """How much sooner `method` reaches the baseline's final quality (curves at the same steps).

    target = baseline[-1]; ratio = steps_to_reach(baseline) / steps_to_reach(method). None (with
    reached=False) when the method never gets there within the evaluated steps."""
    target = float(baseline[-1])
    base_steps = steps_to_reach(steps, baseline, target)
    method_steps = steps_to_reach(steps, method, target)
    return {"target": target, "baseline_steps": base_steps, "method_steps": method_steps,
            "reached": method_steps is not None,
            "ratio": None if method_steps is None else base_steps / method_steps}


def read_quality(metrics_jsonl, key: str | None = None) -> tuple[str, list[int], list[float]]:
    """(key, steps, values) of the quality records in a metrics.jsonl (key: "fid", else "fd_raw")."""
    records = []
    with open(metrics_jsonl) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    if key is None:
        key = next((k for k in QUALITY_KEYS if any(k in r for r in records)), None)
        if key is None:
            raise ValueError(f"{metrics_jsonl} has no quality records (keys {QUALITY_KEYS})")
    rows = sorted((int(r["step"]), float(r[key])) for r in records if key in r and "step" in r)
    if not rows:
        raise ValueError(f"{metrics_jsonl} has no records with {key!r}")
    return key, [s for s, _ in rows], [v for _, v in rows]


def plot_quality(metrics_jsonl, out_png, key: str | None = None, label: str | None = None) -> str:
    """Plot quality (Fréchet distance, lower is better) vs training step from a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, steps, values = read_quality(metrics_jsonl, key)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, marker="o", label=label or Path(metrics_jsonl).parent.name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{key} (lower is better)")
    if min(values) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return str(out_png)
