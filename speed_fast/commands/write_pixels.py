"""`speed-fast write-pixels`: a folder or tar of class folders -> a pixel-space .beton (no VAE; see
speed_fast.data.pixels), e.g. CIFAR-10 for the `cifar10` preset:

    speed-fast write-pixels ../shared/data/cifar10/train.tar.gz --out data/cifar10-train.beton
"""

from __future__ import annotations

HELP = "write images (a folder or .tar[.gz] of class folders) as pixels in [-1, 1] to an FFCV .beton"


def add_arguments(p) -> None:
    p.add_argument("source", metavar="SOURCE", help="SOURCE/<class>/<image> folder, or a .tar/.tar.gz/.tgz of one")
    p.add_argument("--out", required=True, metavar="FILE.beton", help="output file (+ FILE.beton.json)")
    p.add_argument("--resolution", type=int, default=None,
                   help="ADM center-crop size; default: keep the images' own (square, all equal) size")
    p.add_argument("--max-images", type=int, default=None, help="keep only the first N images (by path)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..data.pixels import write_pixels

    status = write_pixels(args.source, args.out, resolution=args.resolution, max_images=args.max_images,
                          progress=not args.no_progress)
    meta = status["meta"]
    print(f"wrote {args.out}: {meta['num_samples']} images of shape {meta['shape']} (float16 pixels in [-1, 1]), "
          f"{meta['num_classes']} classes {meta['class_names'][:10]}; skipped {status['skipped']} unreadable image(s)")
    return 0
