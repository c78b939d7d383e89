"""`speed-fast write-latents`: latents made elsewhere (.npy, .npz, fast-DiT folders) -> a latent .beton."""

from __future__ import annotations

HELP = "write latents from ARRAYS.npy (+ --labels), ARRAYS.npz or a fast-DiT features folder to an FFCV .beton"


def add_arguments(p) -> None:
    p.add_argument("source", metavar="ARRAYS.npy|ARRAYS.npz|DIR",
                   help="latents [N, C, H, W]: a .npy (labels via --labels), a .npz with latents/x/features "
                        "and labels/y (optional class_names), or fast-DiT's folder holding <name>_features/ "
                        "and <name>_labels/ of per-image .npy files")
    p.add_argument("--out", required=True, metavar="FILE.beton", help="output latent file (+ FILE.beton.json)")
    p.add_argument("--labels", default=None, metavar="LABELS.npy", help="int labels [N] (required for a .npy)")
    p.add_argument("--class-names", default=None, metavar="FILE.txt", help="class names, one per line")
    p.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--flip-copies", action="store_true",
                   help="latents are [N, 2, C, H, W]: each image and its mirrored image")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import os

    from ..data.latents import write_latents
    from ..data.sources import load_latent_source
    from ..lockfile import output_lock

    latents, labels, class_names = load_latent_source(args.source, args.labels, progress=not args.no_progress)
    if args.class_names is not None:
        if not os.path.isfile(args.class_names):
            raise ValueError(f"--class-names {args.class_names!r} is not a file")
        with open(args.class_names) as f:
            class_names = [line.rstrip("\n") for line in f if line.strip()]
    with output_lock(args.out, "write-latents"):
        meta = write_latents(args.out, latents, labels, class_names=class_names, store_dtype=args.store_dtype,
                             flip_copies=args.flip_copies, progress=not args.no_progress,
                             extra={"converted_from": os.path.abspath(args.source)})
    print(f"wrote {args.out}: {meta['num_samples']} latents of shape {meta['shape']} ({meta['store_dtype']}), "
          f"{meta['num_classes']} classes")
    return 0
