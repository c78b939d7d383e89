"""Training-time evaluation: a fixed-seed sample set of the model against a reference set."""

from __future__ import annotations

import operator
import time

import numpy as np
import torch

from ..sampling import sample
from ..schedule import NoiseSchedule
from .features import RawFeatures, feature_stats, features_of
from .frechet import frechet_distance, gaussian_stats


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
    The result key is features.key ("fd_raw" or "fid"). A text-to-image model gets `text`, the
    conditions of the whole set (tokens [n_samples, L, D], pooled [n_samples, D]; sample i draws with
    row i, every rank holds them all), and `null_text` for guidance (speed_fast.sampling.sample).
    """

    def __init__(self, reference, schedule: NoiseSchedule, n_samples: int = 256, steps="ddim25",
                 method: str = "ddim", eta: float = 0.0, cfg_scale: float = 1.0, seed: int = 0,
                 batch_size: int = 256, num_classes: int | None = None, shape=None, learn_sigma: bool | None = None,
                 clip_denoised: bool = False, features=None, decode=None, device=None, rank: int | None = None,
                 world: int | None = None, group=None, autocast: bool | None = None, text=None, null_text=None):
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
        if text is not None and (len(text) != 2 or any(len(a) != n_samples for a in text)):
            raise ValueError(f"text must be (tokens, pooled) of the {n_samples} samples, got "
                             f"{[list(a.shape) for a in text]}")
        self.text, self.null_text = text, null_text
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
        kwargs = self.sample_kwargs
        if self.text is not None:
            kwargs = {**kwargs, "text": tuple(a[indices.start:indices.stop] for a in self.text),
                      "null_text": self.null_text}
        with torch.autocast(self._autocast_device, dtype=torch.bfloat16, enabled=self.autocast):
            x = sample(model, self.schedule, len(indices), device=self.device, first_index=indices.start, **kwargs)
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
