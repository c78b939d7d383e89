"""Command-line pieces several commands share (not a command itself): the sampling flags and the
check that an output path can be written. Library code lives outside speed_fast.commands."""

from __future__ import annotations

import os


def add_sampling_arguments(p) -> None:
    """The flags `sample` and `eval` share to draw samples from a run (see speed_fast.generate).
    Every flag has a full name that no launcher (torchrun, deepspeed) takes for its own, so the
    command runs unchanged after `torchrun ... $(which speed-fast)` (tests/test_launcher_flags.py)."""
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")
    p.add_argument("--steps", default="250", help="sampling steps: N, 'ddimN' or 'a,b,...' (respacing)")
    p.add_argument("--method", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-channels", type=int, default=None, metavar="C",
                   help="guide only the first C eps channels (default all; 3 reproduces DiT's forward_with_cfg on "
                        "4-channel latents, to match published DiT numbers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels, cycled over the samples (default: random per sample)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per forward pass (per rank); the samples depend on it, not on the number of ranks")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:1 ... (default auto: cuda when available; under a launcher each rank "
                        "takes the GPU of its LOCAL_RANK)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory, for runs on latents")
    p.add_argument("--clip-denoised", action="store_true", help="clip predicted x0 to [-1, 1] (pixel-space runs)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="the model's forward pass: fp32, or bf16 autocast (the sampler's arithmetic stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")


def sampling_options(args) -> dict:
    """The keyword arguments of speed_fast.generate.generate from the flags above."""
    return dict(ema=args.ema, steps=args.steps, method=args.method, eta=args.eta, cfg=args.cfg,
                cfg_channels=args.cfg_channels, seed=args.seed, labels=args.labels, batch_size=args.batch_size,
                device=args.device, vae=args.vae, clip_denoised=args.clip_denoised, precision=args.precision,
                compile=args.compile)


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
