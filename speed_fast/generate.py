"""Samples of a trained run: load its checkpoint, sample, decode latents with a local VAE.

What `speed-fast sample` and `speed-fast eval RUN_DIR` draw:

    x = generate(run_dir, n, ema=True, steps="ddim25", method="ddim", seed=0, device="cpu")

The run's model comes from the trainer's inference loader (speed_fast.training.load_for_inference),
the samples from speed_fast.sampling.sample, and runs on latents are decoded with speed_fast.vae.
"""

from __future__ import annotations

import math
import os

import torch

from .devices import resolve_device
from .models.registry import run_model_config


def check_sampling_options(n: int, batch_size: int, cfg: float, eta: float, labels: str | None) -> None:
    """The sampling options' values, before a model is loaded (ValueError naming the flag)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"--cfg must be a finite number >= 0, got {cfg!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1], got {eta!r}")
    parse_labels(labels, 1)


def parse_labels(spec: str | None, n: int, start: int = 0) -> torch.Tensor | None:
    """int64 [n]: comma-separated class labels cycled over samples start .. start + n - 1 of a set
    (None: random per sample)."""
    if spec is None:
        return None
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {spec!r}") from None
    if not values:
        raise ValueError(f"--labels must name at least one class, got {spec!r}")
    return torch.tensor([values[(start + i) % len(values)] for i in range(n)], dtype=torch.int64)


def sample_footprint(run_dir: str, n: int, vae: str | None, batch_size: int, outputs: dict[str, str | None]) -> dict:
    """What `n` samples of the run will take (sample_to_files), checked before any model is loaded:
    on disk n x bytes per sample (float32 .npz; the grid PNG at most its raw uint8 size, of at most
    MAX_GRID_IMAGES samples) against the free disk of each output's file system; in memory one
    batch and the grid's samples (float32) against the available memory. ValueError with the
    estimate when they do not fit; else the estimate (for printing)."""
    import shutil

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    config = check_run_config(run_dir_of(run_dir))
    model = run_model_config(config, "config.json")
    shape = (config.get("data_meta") or {}).get("shape") or [model.in_channels, model.input_size, model.input_size]
    c, h, w = (3, 8 * shape[1], 8 * shape[2]) if vae is not None else tuple(shape)
    per_sample_mem = 4 * c * h * w
    need_disk = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        need = min(n, MAX_GRID_IMAGES) * c * (h + 1) * (w + 1) if flag == "--out" else n * (4 * c * h * w + 8)
        device = os.stat(_existing_parent(path)).st_dev
        entry = need_disk.setdefault(device, [path, 0])
        entry[1] += 2 * need if flag == "--save" else need  # the .npy files, then the .npz made of them
    for path, need in need_disk.values():
        free = shutil.disk_usage(_existing_parent(path)).free
        if need > free:
            raise ValueError(f"--n {n}: the outputs need about {need:,} bytes ({n} samples of {c}x{h}x{w}), "
                             f"{free:,} are free on the file system of {path}")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: the disk check stands alone
        available = None
    need_mem = (min(n, batch_size) + min(n, MAX_GRID_IMAGES)) * per_sample_mem
    if available is not None and need_mem > available:
        raise ValueError(f"--batch-size {batch_size}: a batch and the grid of {c}x{h}x{w} samples (float32) need "
                         f"about {need_mem:,} bytes of memory, {available:,} are available; use a smaller --batch-size")
    return {"shape": (c, h, w), "memory_bytes": need_mem, "disk_bytes": sum(v[1] for v in need_disk.values())}


def _existing_parent(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    return d


def run_dir_of(path: str) -> str:
    """The run directory of `path`: itself, or the run holding it when it is a checkpoint directory."""
    from .training.checkpoint import STATE_FILE

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


def check_run_config(run_dir: str) -> dict:
    """A run's config.json, checked for what loading its model needs (through the one JSON reader):
    one model config (`dit_config` or `unet_config`, speed_fast.models.registry) whose keys are its
    family's fields, and `train.schedule`. ValueError naming the file."""
    from .jsonfile import read_json_object

    path = os.path.join(run_dir, "config.json")
    config = read_json_object(path)
    run_model_config(config, path)
    train = config.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("schedule"), dict):
        raise ValueError(f"{path}: 'train.schedule' is missing; expected the run's noise schedule")
    return config


def load_checked(run_dir: str, ema: bool, device="cpu", checkpoint: str | None = None):
    """load_for_inference(run_dir, ...) with config.json checked first and weights that do not fit
    the model (a wrong shape) named as a ValueError instead of torch's RuntimeError."""
    import sys

    from .training.checkpoint import checkpoint_tags, load_for_inference

    check_run_config(run_dir)
    try:
        if checkpoint is None:  # the newest usable one, saying which when newer ones are damaged
            problems = []
            for tag in reversed(checkpoint_tags(os.path.join(run_dir, "checkpoints"))):
                try:
                    loaded = load_for_inference(run_dir, ema=ema, device=device, checkpoint=tag)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                if problems:
                    print(f"[speed_fast] warning: using checkpoint {tag} of {run_dir}; {len(problems)} newer one(s) "
                          f"are unusable: {'; '.join(problems)}", file=sys.stderr)
                return loaded
        return load_for_inference(run_dir, ema=ema, device=device, checkpoint=checkpoint)
    except (RuntimeError, TypeError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{run_dir}: the {'EMA' if ema else 'model'} weights do not load into the run's model "
                         f"({type(exc).__name__}: {reason[:500]})") from None


def load_run(run_dir: str, ema: bool, device):
    """(model in eval mode, NoiseSchedule, data meta) of a run (or of a checkpoint directory inside
    one), through `speed_fast.training.checkpoint.load_for_inference` (newest complete checkpoint)."""
    from .training.checkpoint import STATE_FILE

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    is_checkpoint = os.path.isfile(os.path.join(run_dir, STATE_FILE))  # a checkpoint directory inside a run
    checkpoint = os.path.abspath(run_dir) if is_checkpoint else None
    model, _config, schedule, meta = load_checked(run_dir_of(run_dir), ema, device, checkpoint)
    return model, schedule, meta


def generate(run_dir: str, n: int, *, ema: bool = False, steps="250", method: str = "ddpm", eta: float = 0.0,
             cfg: float = 1.0, seed: int = 0, labels: str | None = None, batch_size: int = 64, device=None,
             vae: str | None = None, clip_denoised: bool = False, return_labels: bool = False):
    """n samples of the run at `run_dir`, decoded to images when `vae` (a local AutoencoderKL
    directory) is given. Raises ValueError when any sample is not finite (e.g. a huge guidance scale)."""
    from .sampling import sample
    from .vae import decode_latents, load_vae

    device = resolve_device(device)
    model, schedule, meta = load_run(run_dir, ema, device)
    channels = int(model.in_channels)
    if channels not in (1, 3) and vae is None:
        raise ValueError(f"{run_dir} was trained on {channels}-channel latents {meta.get('shape')}; "
                         "pass --vae DIR (a local diffusers AutoencoderKL) to decode them")
    x, y = sample(model, schedule, n, parse_labels(labels, n), steps=steps, method=method, eta=eta, cfg_scale=cfg,
                  seed=seed, device=device, batch_size=batch_size, clip_denoised=clip_denoised, return_labels=True,
                  progress=True)
    bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} of {n} samples are not finite (NaN or infinity) with --cfg {cfg:g}, --steps "
                         f"{steps} ({method}); nothing was written")
    if vae is not None:
        x = decode_latents(load_vae(vae, device), x)
    return (x, y) if return_labels else x


MAX_GRID_IMAGES = 1024  # the grid PNG shows at most the first 1024 samples (32 x 32 tiles); the .npz holds all


def sample_to_files(run_dir: str, n: int, grid: str, npz: str | None, *, nrow: int | None = None, ema: bool = False,
                    steps="250", method: str = "ddpm", eta: float = 0.0, cfg: float = 1.0, seed: int = 0,
                    labels: str | None = None, batch_size: int = 64, device=None, vae: str | None = None,
                    clip_denoised: bool = False) -> dict:
    """n samples of the run drawn batch by batch (the same set as generate(), any batch size) and
    streamed to disk: all of them (and their labels) to the .npz `npz` through .npy files appended batch
    by batch, the first MAX_GRID_IMAGES to the grid PNG `grid`. Resident memory is one batch plus the
    grid, whatever n is. Both files are written under temporary names and published together
    (speed_fast.atomic): a failure (e.g. non-finite samples) leaves existing files as they were.
    Returns {"shape": per-sample shape, "grid_images": how many the grid shows}."""
    import numpy as np

    from .atomic import publish, temporary_name
    from .sampling import sample, save_grid
    from .vae import decode_latents, load_vae

    device = resolve_device(device)
    model, schedule, meta = load_run(run_dir, ema, device)
    channels = int(model.in_channels)
    if channels not in (1, 3) and vae is None:
        raise ValueError(f"{run_dir} was trained on {channels}-channel latents {meta.get('shape')}; "
                         "pass --vae DIR (a local diffusers AutoencoderKL) to decode them")
    decoder = load_vae(vae, device) if vae is not None else None
    grid_n = min(n, MAX_GRID_IMAGES)
    shown, temps, arrays = [], [], {}
    tmp_npz = temporary_name(npz) if npz else None
    try:
        from tqdm import tqdm

        for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", leave=False):
            k = min(batch_size, n - start)
            x, y = sample(model, schedule, k, parse_labels(labels, k, start), steps=steps, method=method, eta=eta,
                          cfg_scale=cfg, seed=seed, device=device, batch_size=k, clip_denoised=clip_denoised,
                          return_labels=True, first_index=start)  # (k, C, H, W)
            bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
            if bad:
                raise ValueError(f"{bad} of {k} samples are not finite (NaN or infinity) with --cfg {cfg:g}, --steps "
                                 f"{steps} ({method}), in the batch from sample {start}; nothing was written")
            if decoder is not None:
                x = decode_latents(decoder, x)
            if x.shape[1] not in (1, 3):
                raise ValueError(f"samples have {x.shape[1]} channels; pass --vae DIR to decode latents to images")
            if npz and not arrays:  # plain appends, not a memory map: written pages never count as ours
                for name, shape, dtype in (("samples", (n,) + tuple(x.shape[1:]), "<f4"), ("labels", (n,), "<i8")):
                    path = f"{tmp_npz}.{name}.npy"
                    temps.append(path)
                    arrays[name] = open(path, "wb")
                    np.lib.format.write_array_header_1_0(arrays[name], {"descr": dtype, "fortran_order": False,
                                                                        "shape": shape})
            if npz:
                arrays["samples"].write(x.numpy().astype("<f4", copy=False).tobytes())
                arrays["labels"].write(y.numpy().astype("<i8", copy=False).tobytes())
            if sum(len(t) for t in shown) < grid_n:
                shown.append(x[: grid_n - sum(len(t) for t in shown)].clone())
        tmp_grid = temporary_name(grid) + os.path.splitext(grid)[1]  # PIL picks the format from the suffix
        temps.append(tmp_grid)
        images = torch.cat(shown)  # (grid_n, C, H, W)
        save_grid(images.clamp(-1, 1), tmp_grid, nrow=nrow or max(1, math.isqrt(grid_n - 1) + 1))
        moves = [(tmp_grid, os.path.abspath(grid))]
        if npz:
            import zipfile

            for f in arrays.values():
                f.close()
            arrays.clear()
            temps.append(tmp_npz)
            with zipfile.ZipFile(tmp_npz, "w", zipfile.ZIP_STORED, allowZip64=True) as z:  # what np.savez writes
                for name in ("samples", "labels"):
                    with open(f"{tmp_npz}.{name}.npy", "rb") as src, \
                            z.open(f"{name}.npy", "w", force_zip64=True) as dst:
                        while chunk := src.read(1 << 24):
                            dst.write(chunk)
            moves.append((tmp_npz, os.path.abspath(npz)))
        publish(moves)
        return {"shape": tuple(images.shape[1:]), "grid_images": grid_n}
    finally:
        for f in arrays.values():
            f.close()
        for path in temps:
            if os.path.exists(path):
                os.remove(path)
