"""`speed-fast sample`: draw images from a trained run and save them as a PNG grid.

    speed-fast sample --ckpt RUN_DIR --ema --n 64 --steps 250 --cfg 1.5 --out grid.png
    speed-fast sample --ckpt RUN_DIR --method ddim --steps ddim50 --vae PATH/TO/sd-vae --out grid.png

The samples come from speed_fast.generate (the trainer's inference loader, the sampler, and for
runs on VAE latents a local diffusers AutoencoderKL, --vae, undoing `speed-fast encode`'s
(z - shift_factor) * scaling_factor: speed_fast.vae); the digits default (1x8x8 in [-1, 1]) is
shown directly. --save PATH.npz also writes the raw samples (and labels) for `speed-fast eval`,
streamed batch by batch (speed_fast.generate.sample_to_files); the grid shows at most the first
MAX_GRID_IMAGES (1024) samples.
"""

from __future__ import annotations

from .common import add_sampling_arguments, check_output, sampling_options

HELP = "sample a trained run (DDPM/DDIM, classifier-free guidance) and save an image grid"


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (or a checkpoint inside it)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    add_sampling_arguments(p)
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default sqrt(n))")
    p.add_argument("--save", default=None, help="also write the decoded samples and labels to this .npz")


def run(args) -> int:
    from ..devices import resolve_device
    from ..generate import MAX_GRID_IMAGES, check_sampling_options, sample_footprint, sample_to_files
    from ..lockfile import output_lock

    check_sampling_options(args.n, args.batch_size, args.cfg, args.eta, args.labels)
    if args.nrow is not None and args.nrow < 1:
        raise ValueError(f"--nrow must be >= 1, got {args.nrow}")
    resolve_device(args.device)
    check_output(args.out, "--out", (".png", ".jpg", ".jpeg"))
    if args.save:
        check_output(args.save, "--save", (".npz",))
    elif args.n > MAX_GRID_IMAGES:
        raise ValueError(f"--n {args.n} without --save: the grid shows at most {MAX_GRID_IMAGES} samples; pass "
                         "--save FILE.npz to keep them all (streamed to disk), or a smaller --n")
    footprint = sample_footprint(args.ckpt, args.n, args.vae, args.batch_size,
                                 {"--out": args.out, "--save": args.save})
    print(f"sampling {args.n} x {'x'.join(map(str, footprint['shape']))}: about {footprint['memory_bytes']:,} bytes "
          f"in memory, {footprint['disk_bytes']:,} on disk")
    with output_lock(args.out, "sample"):
        done = sample_to_files(args.ckpt, args.n, args.out, args.save, nrow=args.nrow, **sampling_options(args))
    shown = f" (the first {done['grid_images']}; at most {MAX_GRID_IMAGES} in a grid)" if done["grid_images"] < args.n \
        else ""
    print(f"wrote {args.out}: {args.n} samples {done['shape']}{shown}, {args.method} {args.steps} steps, "
          f"cfg {args.cfg}, seed {args.seed}{', EMA' if args.ema else ''}")
    if args.save:
        print(f"wrote {args.save}: all {args.n} samples and labels")
    return 0
