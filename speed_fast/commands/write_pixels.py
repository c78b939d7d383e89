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
    p.add_argument("--captions", default=None, metavar="FILE",
                   help="a caption file (JSON lines of {\"image\": path under SOURCE, \"caption\": text}, or COCO's "
                        "captions_*.json): one record per (image, caption) pair with its text embeddings; SOURCE "
                        "a folder; needs --text-encoder")
    p.add_argument("--text-encoder", default=None, metavar="NAME_OR_DIR",
                   help="the CLIP text encoder for --captions: a hub id or a save_pretrained directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..data.pixels import write_pixels

    status = write_pixels(args.source, args.out, resolution=args.resolution, max_images=args.max_images,
                          progress=not args.no_progress, captions=args.captions, text_encoder=args.text_encoder)
    meta = status["meta"]
    what = (f"{meta['num_classes']} classes {meta['class_names'][:10]}" if "text" not in meta else
            f"(image, caption) pairs of {status['images']} images, text {meta['text']['encoder']} "
            f"[{meta['text']['tokens']}, {meta['text']['width']}]")
    print(f"wrote {args.out}: {meta['num_samples']} images of shape {meta['shape']} (float16 pixels in [-1, 1]), "
          f"{what}; skipped {status['skipped']} unreadable image(s)")
    return 0
