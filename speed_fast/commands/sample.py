"""`speed-fast sample`: draw images from a trained run and save them as a PNG grid.

    speed-fast sample --ckpt RUN_DIR --ema --n 64 --steps 250 --cfg 1.5 --out grid.png
    speed-fast sample --ckpt RUN_DIR --method ddim --steps ddim50 --vae PATH/TO/sd-vae --out grid.png

The run's checkpoint is loaded with the trainer's inference loader (model, schedule, data
description). Runs on VAE latents are decoded with a local diffusers AutoencoderKL directory
(--vae; nothing is downloaded) after undoing `speed-fast encode`'s (z - shift_factor) *
scaling_factor with the VAE's own config; the digits default (1x8x8 in [-1, 1]) is
shown directly. --save PATH.npz also writes the raw samples (and labels) for `speed-fast eval`.
"""

from __future__ import annotations

import math
import os

HELP = "sample a trained run (DDPM/DDIM, classifier-free guidance) and save an image grid"


def add_sampling_arguments(p) -> None:
    """The flags `sample` and `eval` share to draw samples from a run."""
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")
    p.add_argument("--steps", default="250", help="sampling steps: N, 'ddimN' or 'a,b,...' (respacing)")
    p.add_argument("--method", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels, cycled over the samples (default: random per sample)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory, for runs on latents")
    p.add_argument("--clip-denoised", action="store_true", help="clip predicted x0 to [-1, 1] (pixel-space runs)")


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (or a checkpoint inside it)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    add_sampling_arguments(p)
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default sqrt(n))")
    p.add_argument("--save", default=None, help="also write the decoded samples and labels to this .npz")


def resolve_device(device):
    """--device as a torch.device: 'cpu', 'cuda' or 'cuda:N' of a GPU this machine has (default: cuda when present)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_output(path: str, flag: str, suffixes: tuple[str, ...]) -> None:
    """Fail before any work when `path` cannot be written as a `suffixes` file."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; expected a file name ending in {' or '.join(suffixes)}")
    if not path.lower().endswith(suffixes):
        raise ValueError(f"{flag} {path!r} must end in {' or '.join(suffixes)}")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {path!r}: cannot write into {existing!r}")


def check_sampling_arguments(args, n: int) -> None:
    """The sampling flags' values, before a model is loaded."""
    import math

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise ValueError(f"--cfg must be a finite number >= 0, got {args.cfg!r}")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1], got {args.eta!r}")
    _parse_labels(args.labels, 1)


def load_run(run_dir: str, ema: bool, device):
    """(model in eval mode, NoiseSchedule, data meta) of a run, through the trainer's
    `speed_fast.training.checkpoint.load_for_inference` (newest complete checkpoint)."""
    from ..training.checkpoint import STATE_FILE, load_for_inference

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    checkpoint = None
    if os.path.isfile(os.path.join(run_dir, STATE_FILE)):  # a checkpoint directory inside a run
        checkpoint = os.path.abspath(run_dir)
        run_dir = os.path.dirname(os.path.dirname(checkpoint))
    model, _config, schedule, meta = load_for_inference(run_dir, ema=ema, device=device, checkpoint=checkpoint)
    return model, schedule, meta


def load_vae(path: str, device):
    """A diffusers AutoencoderKL from a local directory (config.json + weights); never downloads."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--vae {path}: expected a local diffusers AutoencoderKL directory with config.json "
                         "(e.g. saved by AutoencoderKL.save_pretrained)")
    from diffusers.models import AutoencoderKL

    return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()


def decode_latents(vae, latents, batch_size: int = 32):
    """Images in [-1, 1] (float32, CPU) from latents stored as (z - shift_factor) * scaling_factor,
    the convention of `speed-fast encode` (speed_fast.data.encode) and of DiT (shift 0)."""
    import torch

    device = next(vae.parameters()).device
    scale = float(vae.config.scaling_factor)
    shift = vae.config.get("shift_factor", None)
    shift = 0.0 if shift is None else float(shift)
    out = []
    with torch.no_grad():
        for s in range(0, latents.shape[0], batch_size):
            z = latents[s:s + batch_size].to(device=device, dtype=vae.dtype) / scale + shift
            out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _parse_labels(spec, n):
    import torch

    if spec is None:
        return None
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {spec!r}") from None
    if not values:
        raise ValueError(f"--labels must name at least one class, got {spec!r}")
    return torch.tensor([values[i % len(values)] for i in range(n)], dtype=torch.int64)


def generate(args, n: int, return_labels: bool = False):
    """Samples of the run at args.ckpt (or args.gen), decoded to images when --vae is given.
    Raises ValueError when any sample is not finite (e.g. a huge guidance scale)."""
    import torch

    from ..sampling import sample

    run_dir = getattr(args, "ckpt", None) or args.gen
    device = resolve_device(args.device)
    model, schedule, meta = load_run(run_dir, args.ema, device)
    channels = int(model.in_channels)
    if channels not in (1, 3) and args.vae is None:
        raise ValueError(f"{run_dir} was trained on {channels}-channel latents {meta.get('shape')}; "
                         "pass --vae DIR (a local diffusers AutoencoderKL) to decode them")
    x, y = sample(model, schedule, n, _parse_labels(args.labels, n), steps=args.steps, method=args.method,
                  eta=args.eta, cfg_scale=args.cfg, seed=args.seed, device=device, batch_size=args.batch_size,
                  clip_denoised=args.clip_denoised, return_labels=True, progress=True)
    bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} of {n} samples are not finite (NaN or infinity) with --cfg {args.cfg:g}, --steps "
                         f"{args.steps} ({args.method}); nothing was written")
    if args.vae is not None:
        x = decode_latents(load_vae(args.vae, device), x)
    return (x, y) if return_labels else x


def run(args) -> int:
    import numpy as np

    from ..sampling import save_grid

    check_sampling_arguments(args, args.n)
    resolve_device(args.device)
    check_output(args.out, "--out", (".png", ".jpg", ".jpeg"))
    if args.save:
        check_output(args.save, "--save", (".npz",))
    x, y = generate(args, args.n, return_labels=True)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"samples have {x.shape[1]} channels; pass --vae DIR to decode latents to images")
    nrow = args.nrow or max(1, math.isqrt(args.n - 1) + 1 if args.n > 1 else 1)
    save_grid(x.clamp(-1, 1), args.out, nrow=nrow)
    print(f"wrote {args.out}: {args.n} samples {tuple(x.shape[1:])}, {args.method} {args.steps} steps, "
          f"cfg {args.cfg}, seed {args.seed}{', EMA' if args.ema else ''}")
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        np.savez(args.save, samples=x.numpy(), labels=y.numpy())
        print(f"wrote {args.save}")
    return 0
