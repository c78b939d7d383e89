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


def run_dir_of(path: str) -> str:
    """The run directory of `path`: itself, or the run holding it when it is a checkpoint directory."""
    from .training.checkpoint import STATE_FILE

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


def load_run(run_dir: str, ema: bool, device):
    """(model in eval mode, NoiseSchedule, data meta) of a run (or of a checkpoint directory inside
    one), through `speed_fast.training.checkpoint.load_for_inference` (newest complete checkpoint)."""
    from .training.checkpoint import STATE_FILE, load_for_inference

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    is_checkpoint = os.path.isfile(os.path.join(run_dir, STATE_FILE))  # a checkpoint directory inside a run
    checkpoint = os.path.abspath(run_dir) if is_checkpoint else None
    model, _config, schedule, meta = load_for_inference(run_dir_of(run_dir), ema=ema, device=device,
                                                        checkpoint=checkpoint)
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
