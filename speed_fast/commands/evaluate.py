"""`speed-fast eval`: Fréchet distance between a generated set and a reference set.

    speed-fast eval --gen samples.npy --ref ref.npz                    # raw data (fd_raw)
    speed-fast eval --gen RUN_DIR --num-samples 1000 --steps 250 --ref digits     # sample a run, then compare
    speed-fast eval --gen samples.npz --ref ref.npz --features inception --inception PATH   # FID

--gen is a .npy/.npz array (see `speed_fast.evaluation.load_array`) or a run directory, which is
sampled like `speed-fast sample` (--ema, --steps, --method, --cfg, --seed, --vae); unless given,
--steps, --method and --clip-denoised are the run's own evaluator settings
(`speed_fast.evaluation.eval_sampling`: DDIM-25, x0 clipped on pixel data), so a run's logged
quality and this command measure the same thing. --ref is an
array file, a latent .beton (e.g. the run's training data; at most --n-ref samples), or `digits`
(the embedded default dataset, 1797 images in [-1, 1]).
"""

from __future__ import annotations

import json
import os

from .common import add_sampling_arguments, sampling_options

HELP = "Fréchet distance (raw data, or FID with local Inception weights) between generated and reference sets"


def add_arguments(p) -> None:
    p.add_argument("--gen", required=True, help="generated set: .npy/.npz array, or a run directory to sample")
    p.add_argument("--ref", required=True, help="reference set: .npy/.npz array, a latent .beton, or 'digits'")
    p.add_argument("--n-ref", type=int, default=10000, help="at most this many reference samples from a .beton")
    p.add_argument("--features", default="raw", choices=["raw", "inception"],
                   help="raw: the data itself (random projection above --max-dim dims); inception: FID")
    p.add_argument("--inception", default=None,
                   help="TorchScript inception-2015-12-05.pt (default $SPEED_FAST_INCEPTION or "
                        "~/.cache/speed_fast/inception-2015-12-05.pt); never downloaded")
    p.add_argument("--max-dim", type=int, default=512, help="raw features: project above this many dims")
    p.add_argument("--num-samples", "--n", dest="n", type=int, default=1000,
                   help="samples to draw when --gen is a run directory (--n: an alias that only works without a "
                        "launcher)")
    add_sampling_arguments(p)
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                   help="do not clip the predicted x0 (default for a run: its evaluator's setting)")
    # None: take the run's evaluator settings (speed_fast.evaluation.run_eval_sampling).
    p.set_defaults(steps=None, method=None, clip_denoised=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from ..devices import resolve_device
    from ..evaluation import (feature_stats, frechet_distance, load_reference, make_features, read_array,
                              run_eval_sampling)

    device = resolve_device(args.device)
    reference, _ = load_reference(args.ref, args.n_ref)  # a bad --ref is named before any sampling
    if os.path.isdir(args.gen):
        from ..generate import check_sampling_options, generate, run_dir_of

        chosen = run_eval_sampling(run_dir_of(args.gen), args.steps, args.clip_denoised)
        args.steps, args.clip_denoised = chosen["steps"], chosen["clip_denoised"]
        args.method = args.method or chosen["method"]
        check_sampling_options(args.n, args.batch_size, args.cfg, args.eta, args.labels)
        generated = generate(args.gen, args.n, **sampling_options(args))
        source = f"{args.n} samples of {args.gen}"
    else:
        generated, _ = read_array(args.gen, "--gen")
        source = args.gen
    if generated.shape[1] == 3 and reference.shape[1] == 1 and generated.shape[2:] == reference.shape[2:] \
            and bool((generated[:, 1:] == generated[:, :1]).all()):
        generated = generated[:, :1]  # `sample --out X.npz` of 1-channel data: the channel repeated to 3 (ADM's format)
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(f"generated samples are {tuple(generated.shape[1:])} but the reference is "
                         f"{tuple(reference.shape[1:])}; compare like with like (decode latents with --vae)")
    features = make_features(args.features, inception_path=args.inception, device=device, max_dim=args.max_dim)
    value = frechet_distance(*feature_stats(generated, features), *feature_stats(reference, features))
    result = {features.key: value, "generated": source, "n_generated": int(generated.shape[0]),
              "reference": args.ref, "n_reference": int(reference.shape[0]), "features": args.features}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{features.key} {value:.6g}   ({result['n_generated']} generated from {source}, "
              f"{result['n_reference']} reference from {args.ref})")
    return 0
