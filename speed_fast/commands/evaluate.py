"""`speed-fast eval`: the metrics ADM's evaluator reports, between a generated set and a reference set.

    speed-fast eval --gen samples.npz --ref VIRTUAL_imagenet256_labeled.npz --features inception
    torchrun --nproc_per_node 8 $(which speed-fast) eval --gen samples.npz --ref REF.npz --features inception
    speed-fast eval --gen samples.npy --ref ref.npz                                # raw data (fd_raw)
    speed-fast eval --gen RUN_DIR --num-samples 1000 --steps 250 --ref digits      # sample a run, then compare
    speed-fast eval --gen samples.npz --clip-model openai/clip-vit-large-patch14   # CLIP score against the prompts

--features inception: FID, sFID, Inception Score, precision and recall (k = 3), as
openai/guided-diffusion's evaluations/evaluator.py defines them (`speed_fast.evaluation.suite`),
from the TorchScript Inception (downloaded once into the cache and checked against its pinned
SHA-256 unless --inception PATH / $SPEED_FAST_INCEPTION name a file, or $SPEED_FAST_OFFLINE /
$HF_HUB_OFFLINE forbid it). Under torchrun or deepspeed each rank computes the features of its
share of both sets on its GPU; rank 0 prints. The reference's features are cached by content
hash (`speed_fast.evaluation.refcache`; --no-ref-cache skips it). FID and sFID use the
mu/sigma/mu_s/sigma_s an ADM reference batch stores (whole-dataset statistics from ADM's
TensorFlow graph, as ADM's evaluator does; --ref-stats auto, the default), else the reference
images' statistics with this network (--ref-stats recompute forces that; not the published
numbers against an ADM batch, whose arr_0 is 10,000 images). Precision and recall use the
reference images (arr_0). The expected difference from ADM's TensorFlow numbers is in
`speed_fast.evaluation.suite`.
--features raw (default): the Fréchet distance of the raw data (fd_raw) and precision/recall on it.

--gen is a .npy/.npz array (ADM's format `arr_0` uint8 [N, H, W, 3], as `speed-fast sample --out`
writes it with the labels in `arr_1`, which eval does not need; or the older `--save` file,
`samples` float [N, C, H, W] in [-1, 1] with `labels`) or a run directory, which is sampled like
`speed-fast sample` (one process; --ema, --steps, --method, --cfg, --seed, --vae); unless given,
--steps, --method and --clip-denoised are the run's own evaluator settings
(`speed_fast.evaluation.eval_sampling`). --ref is an array file, a latent .beton (at most --n-ref
samples), or `digits`. A file that holds no image array is refused with one line (exit 2). `--n` is the one-process spelling of
--num-samples (a launcher takes `--n` for its own `--nnodes`/`--nproc-per-node`).

--clip-model NAME (a hub id or a save_pretrained CLIPModel directory): the CLIP score of the --gen
array file against its prompts (`speed_fast.evaluation.clip_score`), alone or beside the --ref
metrics; the prompts are the .npz's `prompts` array (`speed-fast sample --prompts` writes it) or
--prompts FILE (one per line; it takes precedence). Bad prompts or a model that is not a CLIPModel
are named before any other metric is computed.

A text-to-image run directory as --gen samples from --prompts FILE (one prompt a line, blank lines
skipped; sample i takes prompt i mod P, as `speed-fast sample --prompts` does; --cfg as given,
default 1 like the run's own evaluator): the same samples serve --ref's metrics and the CLIP score,
each scored against its own prompt. Without --prompts such a run is refused with one line.
"""

from __future__ import annotations

import json
import os

from .common import add_sampling_arguments, sampling_options

HELP = ("ADM's metrics (FID, sFID, Inception Score, precision, recall) or the raw Fréchet distance between "
        "generated and reference sets, and the CLIP score of generated images against their prompts")


def add_arguments(p) -> None:
    p.add_argument("--gen", required=True, help="generated set: .npy/.npz array (arr_0 uint8 [N, H, W, 3]), or a "
                                                "run directory to sample")
    p.add_argument("--ref", default=None, help="reference set: .npy/.npz array (e.g. ADM's reference batch), a "
                                               "latent .beton, or 'digits' (optional with --clip-model)")
    p.add_argument("--n-ref", type=int, default=10000, help="at most this many reference samples from a .beton")
    p.add_argument("--features", default="raw", choices=["raw", "inception"],
                   help="raw: the data itself (fd_raw, precision/recall); inception: FID, sFID, IS, precision, recall")
    p.add_argument("--inception", default=None,
                   help="a local TorchScript inception-2015-12-05.pt (default $SPEED_FAST_INCEPTION, else the cache, "
                        "downloaded once unless $SPEED_FAST_OFFLINE or $HF_HUB_OFFLINE is set)")
    p.add_argument("--ref-stats", default="auto", choices=["auto", "stored", "recompute"],
                   help="FID/sFID reference statistics. auto (default, ADM's rule): the mu/sigma/mu_s/sigma_s an ADM "
                        "reference batch stores, when present and of this network's size, else recompute; stored: "
                        "require them; recompute: from the reference images with this network")
    p.add_argument("--no-ref-cache", dest="ref_cache", action="store_false",
                   help="neither read nor write the reference-features cache")
    p.add_argument("--clip-model", default=None, metavar="NAME",
                   help="CLIP score of --gen against its prompts with this CLIPModel: a hub id (e.g. "
                        "openai/clip-vit-large-patch14; HF_HUB_OFFLINE=1 for the hub cache only) or a save_pretrained "
                        "directory")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="CLIP score's prompts, one per line, one per --gen image in order (default: the --gen .npz's "
                        "'prompts' array); for a text-to-image run directory, the prompts to sample from (sample i "
                        "takes prompt i mod P)")
    p.add_argument("--max-dim", type=int, default=512, help="raw features: project above this many dims")
    p.add_argument("--num-samples", "--n", dest="num_samples", type=int, default=1000,
                   help="samples to draw when --gen is a run directory (--n: the same, outside a launcher)")
    add_sampling_arguments(p)
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                   help="do not clip the predicted x0 (default for a run: its evaluator's setting)")
    # None: take the run's evaluator settings (speed_fast.evaluation.run_eval_sampling).
    p.set_defaults(steps=None, method=None, clip_denoised=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_prompts(args) -> list[str] | None:
    """The prompts a run directory --gen samples from: --prompts FILE for a text-to-image run (refused
    without it), None for a class-conditional one (which takes no --prompts)."""
    from ..generate import check_run_config, read_prompts, run_dir_of

    try:
        config = check_run_config(run_dir_of(args.gen))
    except ValueError as exc:
        raise ValueError(f"--gen {args.gen!r} is a directory but not a run directory ({exc})") from None
    text = bool(config.get("data_meta", {}).get("text"))
    if not text:
        if args.prompts is not None:
            raise ValueError(f"--prompts {args.prompts!r}: --gen {args.gen!r} is a class-conditional run; prompts "
                             "are for a text-to-image run or for the CLIP score of an array file")
        return None
    if args.prompts is None:
        raise ValueError(f"--gen {args.gen!r} is a text-to-image run: pass --prompts FILE (one prompt a line; sample "
                         "i takes prompt i mod P), the prompts it samples from and the CLIP score compares with")
    return read_prompts(None, args.prompts)


def _generated(args, job):
    """(set, description) of --gen: a run directory's samples (float, in memory; drawn once, kept on
    args for the CLIP score) or (None, path) for an array file."""
    from ..evaluation import run_eval_sampling

    if not os.path.isdir(args.gen):
        return None, args.gen
    if job.world > 1:
        raise ValueError(f"--gen {args.gen!r} is a run directory: sampling inside eval runs as one process; under a "
                         "launcher, sample with `speed-fast sample --out samples.npz` and evaluate that file")
    if getattr(args, "_drawn", None) is not None:
        return args._drawn
    from ..generate import check_sampling_options, generate, run_dir_of

    prompts = _run_prompts(args)
    chosen = run_eval_sampling(run_dir_of(args.gen), args.steps, args.clip_denoised)
    args.steps, args.clip_denoised = chosen["steps"], chosen["clip_denoised"]
    args.method = args.method or chosen["method"]
    check_sampling_options(args.num_samples, args.batch_size, args.cfg, args.eta, args.labels)
    args._drawn = (generate(args.gen, args.num_samples, prompts=prompts, **sampling_options(args)),
                   f"{args.num_samples} samples of {args.gen}")
    return args._drawn


def _inception(args, job) -> dict:
    from ..evaluation import InceptionNet, TensorImages, adm_metrics, load_reference, open_images, resolve_inception

    def open_ref():
        if args.ref == "digits" or args.ref.endswith(".beton"):
            return TensorImages(load_reference(args.ref, args.n_ref)[0], f"--ref {args.ref!r}"), None
        return open_images(args.ref, "--ref"), args.ref

    reference, ref_path = job.agree(open_ref)  # a bad --ref is named before any sampling
    generated, source = job.agree(_generated, args, job)
    generated = TensorImages(generated, source) if generated is not None else job.agree(open_images, args.gen, "--gen")
    path = job.on_main(resolve_inception, args.inception)  # rank 0 downloads (once) before the others load it
    net = job.agree(InceptionNet, path, job.device)
    result = adm_metrics(generated, reference, net, job, batch_size=args.batch_size,
                         reference_statistics=args.ref_stats, cache=args.ref_cache, reference_path=ref_path,
                         device=job.device)
    return {**result, "generated": source, "reference": args.ref}


def _raw(args, job) -> dict:
    from ..evaluation import load_reference, make_features, raw_metrics, read_array

    reference, _ = load_reference(args.ref, args.n_ref)  # a bad --ref is named before any sampling
    generated, source = _generated(args, job)
    if generated is None:
        generated, _ = read_array(args.gen, "--gen")
    if generated.shape[1] == 3 and reference.shape[1] == 1 and generated.shape[2:] == reference.shape[2:] \
            and bool((generated[:, 1:] == generated[:, :1]).all()):
        generated = generated[:, :1]  # `sample --out X.npz` of 1-channel data: the channel repeated to 3 (ADM's format)
    features = make_features("raw", max_dim=args.max_dim)
    return {**raw_metrics(generated, reference, features, device=job.device), "generated": source,
            "reference": args.ref}


def _clip_set(args):
    """(images, prompts, where the prompts came from) of --gen for CLIP score; for a run directory
    (None, its prompts per sample, source), the images being drawn later (_generated)."""
    from ..evaluation import open_images, read_prompts

    if os.path.isdir(args.gen):
        prompts = _run_prompts(args)
        if prompts is None:
            raise ValueError(f"--gen {args.gen!r} is a class-conditional run; CLIP score needs images drawn from "
                             "prompts (a text-to-image run, or an array file with its prompts)")
        return (None, [prompts[i % len(prompts)] for i in range(args.num_samples)],
                f"{args.prompts} (sample i: prompt i mod {len(prompts)})")
    images = open_images(args.gen, "--gen")
    return (images, *read_prompts(args.gen, args.prompts, images.n))


def _clip_inputs(args, job):
    """(images, prompts, prompt source, CLIP model) of --clip-model, every input checked before any metric
    runs (images None for a run directory: drawn afterwards)."""
    from ..evaluation import load_clip
    from ..text import resolve_text_encoder

    images, prompts, source = job.agree(_clip_set, args)
    job.on_main(resolve_text_encoder, args.clip_model, "--clip-model")  # rank 0 downloads (once), then all load
    return images, prompts, source, job.agree(load_clip, args.clip_model, job.device)


def run(args) -> int:
    from ..distributed import launch_job
    from ..evaluation import clip_score, format_table

    if args.ref is None and args.clip_model is None:
        raise ValueError("eval needs --ref REF (FID and the other metrics against a reference set), --clip-model NAME "
                         "(CLIP score against the prompts), or both")
    if args.prompts is not None and args.clip_model is None and not os.path.isdir(args.gen):
        raise ValueError(f"--prompts {args.prompts!r} is for CLIP score; give --clip-model NAME too")
    with launch_job(args.device) as job:
        clip = _clip_inputs(args, job) if args.clip_model is not None else None
        result = {"generated": args.gen}
        if args.ref is not None and args.features == "inception":
            result = _inception(args, job)
        elif args.ref is not None:
            result = job.on_main(_raw, args, job)
        if clip is not None:
            images, prompts, source, model = clip
            if images is None:  # a run directory: its samples (drawn above for --ref, or now)
                from ..evaluation import TensorImages

                images = TensorImages(*_generated(args, job))
            result.update(clip_score(images, prompts, model, job, batch_size=args.batch_size), clip_prompts=source)
    if not job.is_main:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(result))
    if args.ref is not None:
        print(f"({result['n_generated']} generated from {result['generated']}, {result['n_reference']} reference "
              f"from {result['reference']}; features: {result['features']}"
              + (f", reference statistics {result['reference_statistics']}, cache {result['reference_cache']})"
                 if result["features"] == "inception" else ")"))
    if clip is not None:
        print(f"(CLIP score: {result['n_generated']} images of {args.gen} against {result['clip_prompts']}, model "
              f"{result['clip_model']}; {result['clip_truncated']} prompts truncated at {result['clip_max_tokens']} "
              "tokens)")
    return 0
