"""`speed-fast sample`: draw a sample set from a trained run, in ADM's .npz format and/or as a PNG grid.

    speed-fast sample --ckpt RUN_DIR --ema --num-samples 64 --steps 250 --cfg 1.5 --out grid.png
    speed-fast sample --ckpt RUN_DIR --ema --num-samples 50000 --cfg 1.5 --vae DIR --out samples.npz --grid grid.png
    torchrun --nproc_per_node 8 $(which speed-fast) sample --ckpt RUN_DIR ... --out samples.npz
    deepspeed --num_gpus 8 $(which speed-fast) sample --ckpt RUN_DIR ... --out samples.npz
    speed-fast sample --ckpt T2I_RUN --ema --prompt "a handwritten seven" --prompt "the digit 3" --out s.npz
    speed-fast sample --ckpt T2I_RUN --ema --prompts prompts.txt --num-samples 30000 --vae ema --out coco.npz

--out FILE.npz writes ADM's sample batch (`arr_0` uint8 [N, H, W, 3], `arr_1` int64 labels; what
openai/guided-diffusion's evaluator and `speed-fast eval --gen` read); --out FILE.png alone writes
only a grid (at most MAX_GRID_IMAGES = 1024 samples); --grid FILE.png adds a grid of the first
samples to an .npz. One process by default; under torchrun or deepspeed every rank draws its share
of the global chunks of --batch-size consecutive samples (speed_fast.sampling_job: the output is the
same bytes for any number of ranks), and rank 0 holds the output lock and writes the outputs.
Finished chunks are kept in FILE.parts/ until the outputs are written: the same command, rerun
after an interruption, continues; other settings are refused naming the difference (or
--overwrite). An output already written with the same settings is left as it is. Runs on latents
are decoded with --vae (speed_fast.vae); `--n` is kept as an alias of --num-samples for one
process (launchers take `--n` for their own prefix of --nnodes / --num_gpus).

A text-to-image run samples from --prompt (repeatable) or --prompts FILE (one a line), cycled over the
samples, with guidance --cfg 1.5 unless given (the null caption as the unconditional branch); the .npz
then also holds `prompts` (each sample's prompt, a unicode array) and arr_1 the prompts' indices. The
text encoder is the one the run's data names (--text-encoder for another); prompts longer than its
token count are truncated, as CLIP does, with one warning line saying how many (speed_fast.generate).
Any number of ranks, as for class labels (every rank embeds the prompts of its own chunks).
"""

from __future__ import annotations

import sys

from .common import add_sampling_arguments, check_output, sampling_options

HELP = "sample a trained run (DDPM/DDIM, guidance; one or many ranks) into ADM's .npz and/or a PNG grid"


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (or a checkpoint inside it)")
    p.add_argument("--num-samples", "--n", dest="num_samples", type=int, default=64,
                   help="number of samples, exactly (--n: an alias that only works without a launcher)")
    add_sampling_arguments(p)
    p.set_defaults(cfg=None)  # 1 (no guidance), or 1.5 with prompts (the paper's Tab. 5)
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text-to-image runs: a prompt (repeatable), cycled over the samples; guidance --cfg 1.5 "
                        "unless given")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text-to-image runs: prompts, one a line")
    p.add_argument("--text-encoder", default=None, metavar="NAME",
                   help="text-to-image runs: the CLIP text encoder (hub id or directory; default: the one the run's "
                        "data was embedded with)")
    p.add_argument("--out", default="grid.png",
                   help="FILE.npz: all samples in ADM's format (arr_0 uint8 [N, H, W, 3], arr_1 labels); "
                        "FILE.png: only a grid of them (default grid.png)")
    p.add_argument("--grid", default=None, metavar="FILE.png", help="with --out FILE.npz: also a grid of the first "
                                                                     "samples (at most 1024)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default sqrt(n))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs (and discard unfinished chunks) made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress lines (rank 0: images/s and ETA)")


def _check(args) -> dict:
    from ..generate import MAX_GRID_IMAGES, check_sampling_options, sample_footprint

    check_sampling_options(args.num_samples, args.batch_size, args.cfg, args.eta, args.labels, args.cfg_channels,
                           args.precision)
    if args.nrow is not None and args.nrow < 1:
        raise ValueError(f"--nrow must be >= 1, got {args.nrow}")
    check_output(args.out, "--out", (".npz", ".png", ".jpg", ".jpeg"))
    npz = args.out.lower().endswith(".npz")
    if args.grid is not None:
        if not npz:
            raise ValueError(f"--grid {args.grid!r} goes with --out FILE.npz; --out {args.out!r} is already a grid")
        check_output(args.grid, "--grid", (".png", ".jpg", ".jpeg"))
    if not npz and args.num_samples > MAX_GRID_IMAGES:
        raise ValueError(f"--num-samples {args.num_samples} with --out {args.out!r}: a grid shows at most "
                         f"{MAX_GRID_IMAGES} samples; pass --out FILE.npz (and --grid FILE.png) to keep them all, "
                         "or fewer --num-samples")
    return sample_footprint(args.ckpt, args.num_samples, args.vae, args.batch_size, {"--out": args.out,
                                                                                      "--grid": args.grid})


def run(args) -> int:
    from ..distributed import JobError, launch_job
    from ..generate import MAX_GRID_IMAGES, RunSampler, read_prompts
    from ..sampling_job import assemble, discard_if_empty, draw_chunks, parts_dir, prepare_outputs, settings_of

    prompts = read_prompts(args.prompt, args.prompts)
    if args.cfg is None:
        args.cfg = 1.5 if prompts is not None else 1.0
    n, options = args.num_samples, sampling_options(args)
    options.update(prompts=prompts, text_encoder=args.text_encoder)
    with launch_job(args.device) as job:
        footprint = job.agree(_check, args)
        say = print if job.is_main else (lambda *a, **k: None)
        say(f"sampling {n} x {'x'.join(map(str, footprint['shape']))} on {job.world} rank(s): about "
            f"{footprint['memory_bytes']:,} bytes in memory per rank, {footprint['disk_bytes']:,} on disk")
        with job.output_lock(args.out, "sample"):
            options["device"] = job.device
            sampler = job.agree(lambda: RunSampler(args.ckpt, **options))
            if sampler.truncated and job.is_main:
                print(f"[speed_fast] warning: {sampler.truncated} of {len(prompts)} prompts are longer than the text "
                      f"encoder's {sampler.encoder.max_tokens} tokens and were truncated to them (as CLIP does)",
                      file=sys.stderr, flush=True)
            settings = job.on_main(settings_of, sampler, options, n)
            plan = job.on_main(prepare_outputs, args.out, args.grid, settings, args.overwrite)
            if plan["complete"]:
                say(f"{args.out} is already complete with these settings ({n} samples); nothing to do")
                return 0
            if plan["done"]:
                say(f"continuing: {len(plan['done'])} finished chunk(s) of {args.batch_size} kept in "
                    f"{parts_dir(args.out)}")
            try:
                drawn = job.agree(draw_chunks, job, sampler, parts_dir(args.out), n, args.batch_size,
                                  set(plan["done"]), not args.no_progress)
            except JobError:
                if job.is_main:
                    discard_if_empty(parts_dir(args.out))
                raise
            done = job.on_main(assemble, parts_dir(args.out), n, args.batch_size, settings, args.out, args.grid,
                               args.nrow, MAX_GRID_IMAGES, prompts=sampler.prompts)
            drawn = sum(job.all_gather(drawn))
    shape = "x".join(map(str, settings["image_shape"]))
    if args.out.lower().endswith(".npz"):
        arrays = "arr_1 prompt indices, prompts" if prompts is not None else "arr_1 labels"
        say(f"wrote {args.out}: {n} samples, arr_0 uint8 [{n}, {shape.replace('x', ', ')}], {arrays}; "
            f"{drawn} chunk(s) drawn on {job.world} rank(s), {args.method} {args.steps} steps, cfg {args.cfg}, "
            f"seed {args.seed}{', EMA' if args.ema else ''}")
    shown = f" (the first {done['grid_images']}; at most {MAX_GRID_IMAGES} in a grid)" \
        if done["grid_images"] < n else ""
    grid = args.grid if args.out.lower().endswith(".npz") else args.out
    if grid:
        say(f"wrote {grid}: {done['grid_images']} samples {shape}{shown}, {args.method} {args.steps} steps, "
            f"cfg {args.cfg}, seed {args.seed}{', EMA' if args.ema else ''}")
    return 0
