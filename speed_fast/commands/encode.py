"""`speed-fast encode`: an image folder -> VAE latents -> a latent .beton (resumable, one or many
processes; see speed_fast.data.encode). Every flag has a full name that neither torchrun's nor the
deepspeed launcher's parser takes by prefix (tests/test_encode_ddp.py checks each)."""

from __future__ import annotations

HELP = ("encode IMAGE_DIR/<class>/<image> with a diffusers VAE (hub id, local directory or .safetensors) into an "
        "FFCV .beton of bf16 latents; on N processes under torchrun or deepspeed")


def add_arguments(p) -> None:
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="one sub-folder per class (sorted names = labels 0..K-1)")
    p.add_argument("--vae", required=True, metavar="NAME",
                   help="a hub id (stabilityai/sd-vae-ft-ema; DiT's ema / mse; downloaded into the hub cache on first "
                        "use, HF_HUB_OFFLINE=1 reads the cache only), a local directory (save_pretrained layout) or "
                        "a .safetensors file (its config.json beside it); AutoencoderKL or AutoencoderTiny")
    p.add_argument("--out", required=True, metavar="FILE.beton", help="output latent file (+ FILE.beton.json)")
    p.add_argument("--resolution", type=int, default=256, help="ADM center-crop size in pixels (default 256)")
    p.add_argument("--flip", action="store_true",
                   help="also encode each horizontally mirrored image (the loader picks one per epoch)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per VAE forward pass, per process (default 32); the output's bytes depend on it")
    p.add_argument("--sample-posterior", action="store_true",
                   help="store a posterior sample (noise keyed by --seed and image index) instead of the mean")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior noise (default 0)")
    p.add_argument("--device", default="auto",
                   help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...; under a launcher each process "
                        "takes the GPU of its LOCAL_RANK")
    p.add_argument("--workers", type=int, default=4, help="image-decoding worker processes per process (default 4)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="images per resumable shard in FILE.beton.parts/ (default 1024)")
    p.add_argument("--max-images", type=int, default=None,
                   help="encode at most this many more images (all processes together), then stop (rerun to continue)")
    p.add_argument("--keep-parts", action="store_true", help="keep FILE.beton.parts/ after writing the .beton")
    p.add_argument("--captions", default=None, metavar="FILE",
                   help="a caption file (JSON lines of {\"image\": path under IMAGE_DIR, \"caption\": text}, or COCO's "
                        "captions_*.json): one record per (image, caption) pair, with its text embeddings; needs "
                        "--text-encoder")
    p.add_argument("--text-encoder", default=None, metavar="NAME_OR_DIR",
                   help="the CLIP text encoder for --captions: a hub id (openai/clip-vit-large-patch14) or a "
                        "save_pretrained directory (e.g. a tiny CLIP from speed_fast.text.build_tiny_clip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..data.encode import encode_folder
    from ..distributed import launch_job

    with launch_job(args.device) as job:
        status = encode_folder(args.image_dir, args.vae, args.out, resolution=args.resolution, flip=args.flip,
                               batch_size=args.batch_size, sample_posterior=args.sample_posterior, seed=args.seed,
                               device=args.device, workers=args.workers, shard_size=args.shard_size,
                               max_images=args.max_images, keep_parts=args.keep_parts,
                               progress=not args.no_progress, job=job, captions=args.captions,
                               text_encoder=args.text_encoder)
    if not job.is_main:
        return 0
    if not status["done"]:
        print(f"encoded {status['encoded']} of {status['images']} images so far ({status['parts']}); "
              "rerun the same command to continue")
        return 0
    meta = status["meta"]
    vae = meta["source"]["vae"]
    what = (f"{meta['num_classes']} classes" if "text" not in meta else
            f"(image, caption) pairs of {status['images']} images, text {meta['text']['encoder']} "
            f"[{meta['text']['tokens']}, {meta['text']['width']}]")
    print(f"wrote {args.out}: {meta['num_samples']} latents of shape {meta['shape']} ({meta['store_dtype']}"
          f"{', with mirrored copies' if meta['flip_copies'] else ''}), {what}; "
          f"VAE {vae['path']} ({vae['class']}, scale {vae['scaling_factor']:g}, shift {vae['shift_factor']:g}); "
          f"skipped {status['skipped']} unreadable image(s)")
    return 0
