"""The metrics ADM's evaluator reports (openai/guided-diffusion `evaluations/evaluator.py`), for two
image sets, with features computed on every rank of a job.

    result = adm_metrics(generated, reference, InceptionNet(), job)        # images: open_images(...)
    result = raw_metrics(generated_tensor, reference_tensor, RawFeatures())
    print(format_table(result))

Definitions and conventions, as ADM's evaluator:
* FID: Fréchet distance of the pool_3 features' Gaussians (mean, unbiased covariance), float64.
* sFID: the same on the spatial features (`mixed_6/conv`, first 7 channels: 2023 dims).
* IS: on the generated set only, softmax of the bias-free logits, splits of 5,000 in file order.
* precision / recall: k = 3 nearest-neighbour manifolds of the pool features, the radii of each
  set from all of its own samples (`speed_fast.evaluation.manifold`).

The reference side: its features are recomputed from its images (`arr_0`) with the same network
as the generated side (`reference_statistics="recompute"`, the default), so both sides of every
metric come from one network. A reference batch of ADM's also stores `mu`/`sigma` and
`mu_s`/`sigma_s`; those come from ADM's TensorFlow graph, and `reference_statistics="stored"`
uses them for FID and sFID (as ADM's evaluator does), comparing TensorFlow statistics with this
network's: closer to ADM's own numbers in principle, but mixing two implementations of the
network. Precision and recall always use the reference images' features from this network (ADM
computes those from arr_0 too).

Expected difference from ADM's TensorFlow numbers: the TorchScript file is a translation of the
same graph and weights, with the same resize (see `speed_fast.evaluation.inception`), so the
features differ only by float rounding and the metrics should agree to a small fraction of a
percent; precision/recall can move by a few boundary points (ADM computes distances in float16).
Not measured here: this environment cannot fetch the network file.

Sharding: each rank takes a contiguous share of each set (rank r: rows [r N / W, (r + 1) N / W)),
extracts features on its device, and every rank's features are gathered in rank order, so the
set is in file order (IS splits depend on it). Rank 0 computes the metrics; reference features
are read from or written to the content-hash cache by rank 0 (`speed_fast.evaluation.refcache`).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from .frechet import frechet_distance, gaussian_stats
from .inception_score import ADM_SPLIT_SIZE, inception_score
from .manifold import ADM_K, precision_recall
from . import refcache

REFERENCE_STATISTICS = ("recompute", "stored")
METRIC_ROWS = (("fid", "FID"), ("fd_raw", "FD (raw)"), ("sfid", "sFID"), ("is", "Inception Score"),
               ("precision", "precision"), ("recall", "recall"))


class LocalJob:
    """One process: the part of `speed_fast.distributed.Job` this module uses."""

    rank, world, is_main = 0, 1, True

    def all_gather(self, obj):
        return [obj]

    def on_main(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def agree(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous rows of n (shares differ by at most one)."""
    return range(rank * n // world, (rank + 1) * n // world)


def extract(images, net, job=None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(pool float32 [N, D], spatial float32 [N, 2023] or None, why spatial is None) of every image
    of `images` in order, on every rank; each rank runs the network on its share."""
    job = job or LocalJob()
    batch_size = operator.index(batch_size)
    pools, spatials = [], []
    for batch in images.batches(share(images.n, job.rank, job.world), batch_size):
        pool, spatial = net.extract(batch)
        pools.append(pool.numpy())
        spatials.append(spatial.numpy() if spatial is not None else None)
    have_spatial = bool(spatials) and all(s is not None for s in spatials)
    mine = (np.concatenate(pools) if pools else None,
            np.concatenate(spatials) if have_spatial else None,
            net.spatial_unavailable if pools and not have_spatial else None)
    parts = [p for p in job.all_gather(mine) if p[0] is not None]
    reason = next((p[2] for p in parts if p[2] is not None), None)
    if reason is None and any(p[1] is None for p in parts):
        reason = net.spatial_unavailable or "a rank gave no spatial features"
    pool = np.concatenate([p[0] for p in parts])
    spatial = None if reason is not None else np.concatenate([p[1] for p in parts])
    return pool, spatial, reason


def _fd(a: tuple, b: tuple) -> float:
    return frechet_distance(*a, *b)


def _check_sets(generated, reference) -> None:
    if generated.shape != reference.shape:
        raise ValueError(f"generated images are {list(generated.shape)} (C, H, W) but the reference images are "
                         f"{list(reference.shape)}; compare sets of one image size (decode latents with --vae)")
    if generated.shape[0] not in (1, 3):
        raise ValueError(f"the Inception metrics need images with 1 or 3 channels, got {generated.shape[0]} "
                         "(latents: decode them with --vae)")
    for name, s in (("generated", generated), ("reference", reference)):
        if s.n < ADM_K + 1:
            raise ValueError(f"the {name} set has {s.n} images; precision/recall (k = {ADM_K} neighbours) and the "
                             f"covariances need at least {ADM_K + 1}")


def adm_metrics(generated, reference, net, job=None, *, batch_size: int = 64,
                reference_statistics: str = "recompute", cache: bool = True, reference_path=None,
                split_size: int = ADM_SPLIT_SIZE, k: int = ADM_K, device=None) -> dict:
    """FID, sFID, IS, precision and recall of image sets (`open_images` / `TensorImages`) under an
    `InceptionNet` (see the module docstring); the same dict on every rank. `reference_path`: the
    reference file, for the content-hash cache (None: no cache)."""
    job = job or LocalJob()
    if reference_statistics not in REFERENCE_STATISTICS:
        raise ValueError(f"reference statistics must be one of {REFERENCE_STATISTICS}, got {reference_statistics!r}")
    job.agree(_check_sets, generated, reference)
    if reference_statistics == "stored" and not reference.stored:
        raise ValueError(f"{reference.name} stores no mu/sigma/mu_s/sigma_s; use the default "
                         "(statistics recomputed from its images)")

    key = None
    if cache and reference_path is not None:
        key = job.on_main(lambda: refcache.reference_key(reference_path, net.identity()))
    hit = job.on_main(lambda: refcache.load(key) is not None) if key else False
    ref_pool = ref_spatial = None
    ref_reason = None
    if not hit:
        ref_pool, ref_spatial, ref_reason = extract(reference, net, job, batch_size)
    gen_pool, gen_spatial, gen_reason = extract(generated, net, job, batch_size)

    def compute() -> dict:
        nonlocal ref_pool
        cache_state = "off"
        ref_spatial_stats = None
        if hit:
            entry = refcache.load(key)
            ref_pool = entry["pool"]
            if "mu_s" in entry:
                ref_spatial_stats = (entry["mu_s"], entry["sigma_s"])
            cache_state = "read"
        else:
            if ref_spatial is not None:
                ref_spatial_stats = gaussian_stats(ref_spatial)
            if key:
                refcache.save(key, ref_pool, ref_spatial_stats)
                cache_state = "written"
        ref_stats = gaussian_stats(ref_pool)
        if reference_statistics == "stored":
            stored = reference.stored
            spatial_dims = gen_spatial.shape[1] if gen_spatial is not None else stored["mu_s"].shape[0]
            if stored["mu"].shape != (ref_pool.shape[1],) or stored["mu_s"].shape != (spatial_dims,):
                raise ValueError(f"{reference.name}: stored mu has {stored['mu'].shape[0]} dims and mu_s "
                                 f"{stored['mu_s'].shape[0]}; this network gives {ref_pool.shape[1]} and "
                                 f"{spatial_dims}")
            ref_stats = (stored["mu"], stored["sigma"])
            ref_spatial_stats = (stored["mu_s"], stored["sigma_s"])
        result = {"fid": _fd(gaussian_stats(gen_pool), ref_stats)}
        reason = gen_reason or ref_reason
        if reason is None and ref_spatial_stats is None:
            reason = "the cached reference entry has no spatial statistics"
        if reason is None and gen_spatial is not None:
            result["sfid"] = _fd(gaussian_stats(gen_spatial), ref_spatial_stats)
        else:
            result["sfid"], result["sfid_unavailable"] = None, reason
        if net.is_unavailable is None:
            result["is"] = inception_score(net.probabilities(gen_pool), split_size)
        else:
            result["is"], result["is_unavailable"] = None, net.is_unavailable
        result["precision"], result["recall"] = precision_recall(ref_pool, gen_pool, k, device=device)
        result.update(features="inception", n_generated=int(gen_pool.shape[0]), n_reference=int(ref_pool.shape[0]),
                      reference_statistics=("stored in the reference file (TensorFlow Inception)"
                                            if reference_statistics == "stored" else "recomputed with this network"),
                      reference_cache=cache_state, network=str(net.path), network_sha256=net.identity(),
                      is_split_size=split_size, k=k)
        return result

    return job.on_main(compute)


def raw_metrics(generated: torch.Tensor, reference: torch.Tensor, features, k: int = ADM_K, device=None) -> dict:
    """fd_raw (the Fréchet distance) and precision/recall on raw features (`RawFeatures`) of two
    in-memory sets; sFID and IS need the Inception network and are reported unavailable."""
    from .features import features_of

    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(f"generated samples are {tuple(generated.shape[1:])} but the reference is "
                         f"{tuple(reference.shape[1:])}; compare like with like (decode latents with --vae)")
    for name, s in (("generated", generated), ("reference", reference)):
        if s.shape[0] < k + 1:
            raise ValueError(f"the {name} set has {s.shape[0]} samples; precision/recall (k = {k} neighbours) "
                             f"need at least {k + 1}")
    gen, ref = features_of(generated, features), features_of(reference, features)
    precision, recall = precision_recall(ref, gen, k, device=device)
    return {features.key: frechet_distance(*gaussian_stats(gen), *gaussian_stats(ref)),
            "sfid": None, "sfid_unavailable": "raw features have no spatial map (use --features inception)",
            "is": None, "is_unavailable": "the Inception Score needs Inception's class probabilities "
                                          "(use --features inception)",
            "precision": precision, "recall": recall, "features": "raw",
            "n_generated": int(gen.shape[0]), "n_reference": int(ref.shape[0]), "k": k}


def format_table(result: dict) -> str:
    """The metrics as a two-column table, unavailable ones with their reason."""
    rows = []
    for key, label in METRIC_ROWS:
        if key not in result:
            continue
        value = result[key]
        rows.append((label, f"{value:.6g}" if value is not None else
                     f"n/a ({result.get(f'{key}_unavailable', 'unavailable')})"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{label.ljust(width)}  {text}" for label, text in rows]
    return "\n".join(lines)
