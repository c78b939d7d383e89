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

The reference side. An ADM reference batch (VIRTUAL_imagenet256_labeled.npz and the others of
guided-diffusion's evaluations/README.md) holds `arr_0`, 10,000 images of the dataset, and
`mu`/`sigma`/`mu_s`/`sigma_s`: pool_3 and spatial statistics that ADM's README says are computed
over the whole dataset (1.28 M images for ImageNet), by ADM's TensorFlow graph. ADM's evaluator
uses the stored statistics for FID and sFID whenever a file has them, and the `arr_0` images only
for precision and recall. `reference_statistics`:
* "auto" (the default, ADM's rule): the stored statistics when the file holds all four and their
  sizes match this network's features (2048 and 2023 for inception-2015-12-05.pt), else the
  statistics of the reference images recomputed with this network (the result says which, and
  why when stored ones were present but not usable);
* "stored": the stored statistics, or an error when they are absent or of the wrong size;
* "recompute": ignore them; mean and covariance of the `arr_0` images' features. Against an ADM
  batch this compares with 10,000 images instead of the whole dataset, so FID and sFID are NOT
  the numbers papers report (a different reference, with its own finite-sample bias; the size
  of the gap has not been measured here): use it for self-consistent comparisons only.
Precision and recall always use the reference images' pool features from this network (as ADM
computes them from `arr_0`); IS uses the generated set only.

Expected difference from ADM's TensorFlow numbers (default statistics, an ADM reference batch):
the TorchScript file is NVIDIA's translation of the same graph and weights, with TensorFlow's
resize replicated (see `speed_fast.evaluation.inception`), so this network's features should
differ from TensorFlow's by floating-point rounding only (different kernels; TF32 matmuls on GPU,
when enabled, round more), and the reference side of FID and sFID is ADM's own stored TensorFlow
statistics. FID, sFID and IS are therefore expected to agree with ADM's printout up to that
rounding (small next to the run-to-run spread of a 50,000-sample FID), not exactly. Precision
and recall can differ by a few points that lie within rounding of a manifold boundary (ADM
computes distances in float16 when they are finite, here in float32). None of this has been
measured: this environment cannot fetch the network file or ADM's batches, so the first run that
has both should compare against ADM's numbers for a published sample batch.

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

REFERENCE_STATISTICS = ("auto", "stored", "recompute")
METRIC_ROWS = (("fid", "FID"), ("fd_raw", "FD (raw)"), ("sfid", "sFID"), ("is", "Inception Score"),
               ("precision", "precision"), ("recall", "recall"), ("clip_score", "CLIP score"),
               ("clip_score_std", "CLIP score std"))


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


def _stored_mismatch(stored: dict, pool_dims: int, spatial_dims: int | None) -> str | None:
    """Why stored mu/sigma/mu_s/sigma_s cannot stand for this network's statistics, or None."""
    want = {"mu": (pool_dims,), "sigma": (pool_dims, pool_dims)}
    if spatial_dims is not None:
        want.update(mu_s=(spatial_dims,), sigma_s=(spatial_dims, spatial_dims))
    for key, shape in want.items():
        if stored[key].shape != shape:
            return f"stored {key} is {list(stored[key].shape)} but this network gives {list(shape)}"
    if not all(np.isfinite(stored[key]).all() for key in want):
        return "the stored statistics have non-finite entries"
    return None


def adm_metrics(generated, reference, net, job=None, *, batch_size: int = 64,
                reference_statistics: str = "auto", cache: bool = True, reference_path=None,
                split_size: int = ADM_SPLIT_SIZE, k: int = ADM_K, device=None) -> dict:
    """FID, sFID, IS, precision and recall of image sets (`open_images` / `TensorImages`) under an
    `InceptionNet` (see the module docstring); the same dict on every rank. `reference_path`: the
    reference file, for the content-hash cache (None: no cache)."""
    job = job or LocalJob()
    if reference_statistics not in REFERENCE_STATISTICS:
        raise ValueError(f"reference statistics must be one of {REFERENCE_STATISTICS}, got {reference_statistics!r}")
    job.agree(_check_sets, generated, reference)
    if reference_statistics == "stored" and not reference.stored:
        raise ValueError(f"{reference.name} stores no mu/sigma/mu_s/sigma_s (ADM's reference batches do); use "
                         "--ref-stats auto or recompute (statistics of its images with this network)")

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
        source = "recomputed from the reference images with this network"
        if reference_statistics != "recompute" and reference.stored:
            mismatch = _stored_mismatch(reference.stored, ref_pool.shape[1],
                                        gen_spatial.shape[1] if gen_spatial is not None else None)
            if mismatch is None:
                ref_stats = (reference.stored["mu"], reference.stored["sigma"])
                if gen_spatial is not None:
                    ref_spatial_stats = (reference.stored["mu_s"], reference.stored["sigma_s"])
                source = "stored in the reference file (ADM's TensorFlow statistics)"
            elif reference_statistics == "stored":
                raise ValueError(f"{reference.name}: {mismatch}; use --ref-stats recompute")
            else:
                source += f" (the stored ones were not used: {mismatch})"
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
                      reference_statistics=source,
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
