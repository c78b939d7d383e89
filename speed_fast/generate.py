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


def parse_labels(spec: str | None, n: int) -> torch.Tensor | None:
    """int64 [n]: comma-separated class labels cycled over n samples (None: random per sample)."""
    if spec is None:
        return None
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {spec!r}") from None
    if not values:
        raise ValueError(f"--labels must name at least one class, got {spec!r}")
    return torch.tensor([values[i % len(values)] for i in range(n)], dtype=torch.int64)


def sample_footprint(run_dir: str, n: int, vae: str | None, outputs: dict[str, str | None]) -> dict:
    """What `n` samples of the run will take, checked before any model is loaded: bytes per sample
    (float32 samples in memory; a uint8 grid PNG and float32 .npz on disk, both at most their raw
    size), n x those against the free disk of each output's file system and the available memory.
    ValueError with the estimate when they do not fit; else the estimate (for printing)."""
    import shutil

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    config = check_run_config(run_dir_of(run_dir))
    shape = (config.get("data_meta") or {}).get("shape") or [config["dit_config"].get("in_channels", 4),
                                                           config["dit_config"].get("input_size", 32),
                                                           config["dit_config"].get("input_size", 32)]
    c, h, w = (3, 8 * shape[1], 8 * shape[2]) if vae is not None else tuple(shape)
    per_sample_mem = 4 * c * h * w
    need_disk = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        per = (c * (h + 1) * (w + 1)) if flag == "--out" else 4 * c * h * w + 8
        device = os.stat(_existing_parent(path)).st_dev
        entry = need_disk.setdefault(device, [path, 0])
        entry[1] += n * per
    for path, need in need_disk.values():
        free = shutil.disk_usage(_existing_parent(path)).free
        if need > free:
            raise ValueError(f"--n {n}: the outputs need about {need:,} bytes ({n} samples of {c}x{h}x{w}), "
                             f"{free:,} are free on the file system of {path}")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: the disk check stands alone
        available = None
    need_mem = n * per_sample_mem
    if available is not None and need_mem > available:
        raise ValueError(f"--n {n}: {n} samples of {c}x{h}x{w} (float32) need about {need_mem:,} bytes of memory, "
                         f"{available:,} are available; draw fewer samples per command")
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
    a `dit_config` object whose keys are DiTConfig's, and `train.schedule`. ValueError naming the file."""
    from dataclasses import fields

    from .jsonfile import read_json_object
    from .models.dit import DiTConfig

    path = os.path.join(run_dir, "config.json")
    config = read_json_object(path)
    dit = config.get("dit_config")
    if not isinstance(dit, dict):
        raise ValueError(f"{path}: 'dit_config' is {type(dit).__name__}, expected an object (is this a run directory "
                         "written by train/main.py?)")
    unknown = sorted(set(dit) - {f.name for f in fields(DiTConfig)})
    if unknown:
        raise ValueError(f"{path}: dit_config has unknown keys {unknown}; expected DiTConfig's fields (written by "
                         "another speed_fast version, or edited?)")
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


def write_samples(x: torch.Tensor, y: torch.Tensor, grid: str, npz: str | None, nrow: int) -> None:
    """The grid PNG (and the samples + labels .npz) written under temporary names and published
    together (speed_fast.atomic): a failure leaves any existing files as they were."""
    import numpy as np

    from .atomic import publish, temporary_name
    from .sampling import save_grid

    moves = []
    try:
        tmp = temporary_name(grid) + os.path.splitext(grid)[1]  # PIL picks the format from the suffix
        moves.append((tmp, os.path.abspath(grid)))
        save_grid(x.clamp(-1, 1), tmp, nrow=nrow)
        if npz:
            tmp = temporary_name(npz)
            moves.append((tmp, os.path.abspath(npz)))
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, samples=x.numpy(), labels=y.numpy())
    except BaseException:
        for tmp, _ in moves:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    publish(moves)
