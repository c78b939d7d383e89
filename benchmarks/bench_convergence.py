"""Convergence benchmark: does SpeeD reach the baseline's sample quality in fewer steps?

    python benchmarks/bench_convergence.py --dataset digits --steps 3000 --eval-every 250 \
        --arms uniform,speed,speed_dual,asym_only:3,weight_only:3,speed_paper_w:3,min_snr:3,p2:3,lognormal:3 \
        --seeds 8 --jobs 2 --out benchmarks/results/convergence_digits.json
    python benchmarks/bench_convergence.py --dataset digits --preset digits-unet --steps 3000 --eval-every 250 \
        --arms uniform,speed_dual --seeds 5 --jobs 2 --out benchmarks/results/convergence_digits_unet.json
    python benchmarks/bench_convergence.py --dataset digits-t2i --steps 3000 --eval-every 250 \
        --arms uniform,speed_dual --seeds 5 --jobs 2 --out benchmarks/results/convergence_digits_t2i.json

Arms (`ARMS`; the first listed is the baseline): uniform; SpeeD as the authors' code runs it without
and with the dual trick (`speed`, `speed_dual`; the configs behind the paper's tables use dual);
asymmetric sampling alone (`asym_only`: k = 5, w = 1); change-aware weighting alone (`weight_only`:
k = 1); the weighting as the paper states it (`speed_paper_w`: w rescaled into [1 - lam, lam] over
all t instead of w = 1 from tau on); min_snr, p2, lognormal and clts (its ramp over the first eighth
of the run, as its reference's 50k steps of ~400k); improved DDPM's loss-second-moment resampler per
time-step bin (`loss_moment`: w = 1, biased; `loss_moment_iw`: importance weights 1 / (T P(t)),
unbiased); adaptive SpeeD (`adaptive_speed`: SpeeD+dual's start, its tau and k re-estimated from the
run's per-bin losses, see speed_fast.adaptive). `name:S` runs S seeds instead of --seeds.

A seed fixes the initial weights, the data order, the label dropout and the noise stream, so the
arms of one seed are paired. Each (arm, seed) is one run of the project's trainer (`train/main.py
--preset P --strategy ... --seed K --eval-every E --eval-online`) in its own directory under
--work-dir; a finished run is reused and an interrupted one resumes from its last checkpoint, so the
benchmark can be stopped and restarted at any time. The trainer evaluates every E steps (the EMA and
the raw weights) with `speed_fast.evaluation.eval_sampling`'s settings (DDIM-25, x0 clipped on
pixel data): Fréchet distance of a fixed-seed sample set to the data ("fd_raw", lower is better).

Reported, per arm, against the baseline on the seeds both ran:
* quality vs step: seed mean with a 95% bootstrap band;
* acceleration ratio at several thresholds: the target is the baseline's (seed-mean) quality at
  50%, 75% and 100% of its steps; ratio = steps the baseline needs to first reach it / steps the arm
  needs (linear interpolation between evaluations; an arm that never reaches it counts as ratio 0);
* log-AUC: the mean of log(quality) over the run (trapezoid over steps); the paired difference
  arm - baseline (< 0: the arm's curve is lower);
* 95% intervals from a paired bootstrap over seeds (the same resampled seeds for both arms), and
  a verdict from each interval: "faster" (ratio interval above 1 / log-AUC interval below 0),
  "slower" (the other way) or "no significant difference" (none with fewer than 3 paired seeds;
  with 3 to 4 the percentile intervals are coarse and read as indicative only);
* per-area held-out eps-MSE of each final EMA model (t uniform within the acceleration /
  deceleration / convergence areas, the same t and noise for every run);
* the metric's floor: the distance between two disjoint real subsets of the evaluation's size.

--dataset digits uses the embedded digits .beton; digits-t2i the captioned digits (a caption per image,
embedded by a tiny CLIP of seed 0: speed_fast.data.ensure_captioned_digits) with the digits-t2i preset's
text-to-image DiT (dit-t2i-s2; caption dropout 0.1; its evaluation samples the captions of the
reference records, so the distance measures text-conditioned samples); otherwise a .beton written by
`speed_fast.data.write_latents` (e.g. `speed-fast write-latents` or the CIFAR-10 pixel data of
`scripts/gpu_convergence.sh`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from speed_fast.evaluation import read_quality, steps_to_reach  # noqa: E402
from speed_fast.theory import AREAS  # noqa: E402

# Every SpeeD parameter spelled out, so an arm does not inherit the preset's (the presets use dual).
_SPEED = {"k": 5.0, "tau": 700, "lam": 0.6, "dual": False}
#: name -> (strategy, parameters) of every arm the benchmark knows.
ARMS = {
    "uniform": ("uniform", {}),
    "speed": ("speed", dict(_SPEED)),
    "speed_dual": ("speed", {**_SPEED, "dual": True}),
    "asym_only": ("speed", {**_SPEED, "weighting": "none"}),
    "weight_only": ("speed", {**_SPEED, "k": 1.0}),
    "speed_paper_w": ("speed", {**_SPEED, "weighting": "paper"}),
    "min_snr": ("min_snr", {}),
    "p2": ("p2", {}),
    "lognormal": ("lognormal", {}),
    # CLTS's 50k-step ramp is ~1/8 of the runs it was made for (~400k steps): here 1/8 of --steps.
    "clts": ("clts", {"ramp_steps": "steps/8"}),
    "loss_moment": ("loss_moment", {}),
    "loss_moment_iw": ("loss_moment", {"importance_weights": True}),
    # Ours: SpeeD+dual's start, tau and k re-estimated every 100 steps from the per-bin losses.
    "adaptive_speed": ("adaptive_speed", {**_SPEED, "dual": True}),
}


def arm_params(arm: str, steps: int) -> dict:
    """ARMS[arm]'s parameters for a run of `steps` steps ("steps/8" becomes steps // 8, at least 1)."""
    return {k: max(1, steps // 8) if v == "steps/8" else v for k, v in ARMS[arm][1].items()}


FRACTIONS = (0.5, 0.75, 1.0)
QUALITY = "fd_raw"


def parse_arms(spec: str, default_seeds: int) -> dict[str, int]:
    """{arm: seeds} from "a,b:3,c" (arms without ':S' get default_seeds), in the given order."""
    arms = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, seeds = item.partition(":")
        if name not in ARMS:
            raise ValueError(f"unknown arm {name!r}; known: {sorted(ARMS)}")
        if name in arms:
            raise ValueError(f"arm {name!r} listed twice")
        try:
            n = int(seeds) if seeds else default_seeds
        except ValueError:
            raise ValueError(f"arm {item!r}: seeds after ':' must be an integer") from None
        if n < 1:
            raise ValueError(f"arm {item!r}: needs at least 1 seed")
        arms[name] = n
    if len(arms) < 2:
        raise ValueError(f"--arms needs a baseline and at least one more arm, got {list(arms)}")
    return arms


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", help="'digits', 'digits-t2i' (the captioned digits, a text-to-image "
                   "model) or a .beton written by speed_fast.data.write_latents")
    p.add_argument("--arms", default="uniform,speed,speed_dual",
                   help=f"comma-separated arms, optionally name:seeds; the first is the baseline. Known: {list(ARMS)}")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 for arms without ':S'")
    p.add_argument("--steps", type=int, default=3000, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--preset", default=None, help="train/main.py preset (digits: a small DiT; digits-unet: the "
                   "unet-small U-Net; digits-t2i: the text-to-image DiT); default digits, or digits-t2i with "
                   "--dataset digits-t2i")
    p.add_argument("--model", default=None, help="train/main.py --model for every run (e.g. unet-small; default: the "
                   "preset's), checked against the finished runs it reuses")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores / jobs threads)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the intervals")
    p.add_argument("--work-dir", default=None, help="run directories (default: <out without .json>.runs)")
    p.add_argument("--trainer-arg", action="append", default=[], help="extra flag for train/main.py (repeatable)")
    p.add_argument("--launcher", default="python", choices=("python", "deepspeed"),
                   help="python: one process per run; deepspeed: `deepspeed train/main.py` (one rank per GPU)")
    p.add_argument("--out", required=True, help="JSON output; the plot goes next to it as .png")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: summarise the (arm, seed) runs already finished in --work-dir (each arm's "
                        "seeds 0..k-1 that are done), e.g. to commit results while a long benchmark still runs")
    p.add_argument("--reuse", action="append", default=[], metavar="JSON",
                   help="a JSON this benchmark wrote earlier (repeatable): its (arm, seed) results count as finished "
                        "runs (not trained again) where its settings match this command's (data set, steps, "
                        "evaluation, preset, model, trainer flags, the arm's strategy and parameters); how the "
                        "committed per-(arm, seed) results carry over to a machine without the run directories")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "digits-t2i" if args.dataset == "digits-t2i" else "digits"
    try:
        args.arms = parse_arms(args.arms, args.seeds)
    except ValueError as exc:
        p.error(str(exc))
    for name in ("steps", "seeds", "eval_every", "eval_samples", "jobs", "bootstrap"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.eval_every:
        p.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    for f in FRACTIONS:
        if round(f * args.steps) % args.eval_every:
            p.error(f"{f:.0%} of --steps ({f * args.steps:g}) must fall on an evaluation (--eval-every "
                    f"{args.eval_every})")
    return args


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def prepare_data(dataset: str) -> tuple[str, torch.Tensor, tuple]:
    """(.beton path, data float32 [N, C, H, W], the model's conditions of each record) of 'digits',
    'digits-t2i' or a .beton: (labels [N],), or (tokens [N, L, D], pooled [N, D]) for a captioned file."""
    from speed_fast.data import ensure_captioned_digits, ensure_digits_beton, open_loader, read_latent_meta

    if dataset in ("digits", "digits-t2i"):
        path = ensure_digits_beton() if dataset == "digits" else ensure_captioned_digits()
    else:
        path = os.path.abspath(dataset)
    n = read_latent_meta(path)["num_samples"]
    x, y, *text = next(iter(open_loader(path, n, seed=0, num_workers=1, drop_last=True, out_dtype=torch.float32)))
    return path, x.clone(), tuple(c.clone() for c in text) if text else (y.clone(),)


def run_dir_for(work_dir: str, arm: str, seed: int) -> str:
    return os.path.join(work_dir, f"{arm}-seed{seed}")


def expected_train(args, arm: str, seed: int) -> dict:
    strategy, params = ARMS[arm][0], arm_params(arm, args.steps)
    want = {"strategy": strategy, "strategy_params": params, "seed": seed, "max_steps": args.steps,
            "eval_every": args.eval_every, "eval_samples": args.eval_samples}
    if args.model is not None:
        want["model"] = args.model
    return want


def is_done(run_dir: str, want: dict) -> bool:
    """Whether run_dir holds a finished run of exactly these settings (its last evaluation at max_steps)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            train = json.load(f)["train"]
        _, s, _ = read_quality(os.path.join(run_dir, "metrics.jsonl"), QUALITY)
    except (OSError, ValueError, KeyError):
        return False
    return all(train.get(k) == v for k, v in want.items()) and s[-1] == want["max_steps"]


def trainer_command(args, beton: str, arm: str, seed: int, run_dir: str) -> list[str]:
    strategy, params = ARMS[arm][0], arm_params(arm, args.steps)
    flags = []
    for k, v in params.items():
        if isinstance(v, bool):
            flag = k.replace("_", "-")
            flags.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            flags += [f"--{k.replace('_', '-')}", str(v)]
    main = os.path.join(ROOT, "train", "main.py")
    head = [sys.executable, main] if args.launcher == "python" else [
        sys.executable, "-m", "deepspeed.launcher.runner", main]
    return [*head, "--preset", args.preset, "--strategy", strategy, *flags,
            "--max-steps", str(args.steps), "--seed", str(seed), "--run-dir", run_dir, "--data", beton,
            "--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples), "--eval-online",
            "--ckpt-every", str(args.eval_every), "--keep-ckpts", "1", "--sample-steps", "50", "--resume", "auto",
            "--no-progress", *(["--model", args.model] if args.model is not None else []), *args.trainer_arg]


def schedule(args) -> list[tuple[str, int]]:
    """(arm, seed) in run order: seed by seed, so the first seeds of every arm finish first."""
    return [(arm, seed) for seed in range(max(args.arms.values())) for arm, n in args.arms.items() if seed < n]


REUSE_KEYS = ("dataset", "steps", "eval_every", "eval_samples", "preset", "model", "trainer_args")


def load_reused(args) -> dict[tuple[str, int], dict]:
    """{(arm, seed): result record} from the --reuse JSONs, for the arms and seeds this command asks for.
    A file whose settings differ from this command's is refused with the difference named (ValueError);
    an arm whose strategy or parameters differ is skipped. The first file that holds an (arm, seed) wins."""
    reused = {}
    for path in args.reuse:
        with open(path) as f:
            doc = json.load(f)
        meta = doc["meta"]
        mine = {"dataset": args.dataset, "steps": args.steps, "eval_every": args.eval_every,
                "eval_samples": args.eval_samples, "preset": args.preset, "model": args.model,
                "trainer_args": args.trainer_arg}
        theirs = {k: meta.get(k) for k in REUSE_KEYS}  # "model" predates some files: absent = None
        diff = {k: (theirs[k], mine[k]) for k in REUSE_KEYS if theirs[k] != mine[k]}
        if diff:
            raise ValueError(f"--reuse {path}: its settings differ from this command's: "
                             + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items()))
        for r in doc["results"]:
            arm, seed = r["arm"], int(r["seed"])
            spec = meta["arms"].get(arm)
            if (arm not in args.arms or seed >= args.arms[arm] or (arm, seed) in reused or spec is None
                    or spec["strategy"] != ARMS[arm][0] or spec["params"] != ARMS[arm][1]):
                continue
            reused[(arm, seed)] = {**r, "reused_from": os.path.relpath(os.path.abspath(path), ROOT)}
    return reused


def run_all(args, beton: str, work_dir: str) -> dict:
    """Train every (arm, seed) not already done (or reused), `args.jobs` at a time; returns wall seconds per run."""
    todo = [(arm, seed) for arm, seed in schedule(args) if (arm, seed) not in args.reused
            and not is_done(run_dir_for(work_dir, arm, seed), expected_train(args, arm, seed))]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running, walls = [], {}
    print(f"[bench] {len(todo)} of {len(schedule(args))} runs to do, {args.jobs} at a time", flush=True)
    while todo or running:
        while todo and len(running) < args.jobs:
            arm, seed = todo.pop(0)
            rd = run_dir_for(work_dir, arm, seed)
            os.makedirs(rd, exist_ok=True)
            cmd = trainer_command(args, beton, arm, seed, rd)
            log = open(os.path.join(rd, "train.log"), "a")
            print(f"[bench] start {arm} seed {seed}", flush=True)
            running.append((arm, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                        cwd=ROOT), log, time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            arm, seed, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            walls[f"{arm}-seed{seed}"] = time.perf_counter() - t0
            if proc.returncode != 0:
                for _, _, other, _, _ in running:
                    other.terminate()
                tail = open(os.path.join(run_dir_for(work_dir, arm, seed), "train.log")).read()[-3000:]
                raise SystemExit(f"[bench] {arm} seed {seed} failed (exit {proc.returncode}):\n{tail}")
            print(f"[bench] done  {arm} seed {seed} in {walls[f'{arm}-seed{seed}']:.0f} s", flush=True)
    return walls


@torch.no_grad()
def heldout_area_mse(run_dir: str, data: torch.Tensor, cond: tuple, draws: int = 2,
                     seed: int = 1234) -> dict:
    """Unweighted eps-MSE of the run's final EMA model per area, t uniform within each area,
    the same (t, noise) for every run (fixed generator), each record under its own conditions `cond`
    (its label, or its caption's tokens and pooled embedding). Cached in the run directory."""
    from speed_fast.diffusion import GaussianDiffusion
    from speed_fast.theory import area_index
    from speed_fast.training.checkpoint import find_resumable, load_for_inference

    cache = os.path.join(run_dir, "area_mse.json")
    ckpt, _, _ = find_resumable(os.path.join(run_dir, "checkpoints"))
    if os.path.isfile(cache):
        with open(cache) as f:
            doc = json.load(f)
        if doc.get("checkpoint") == os.path.basename(ckpt or ""):
            return doc["area_mse"]
    model, _, schedule_, _ = load_for_inference(run_dir, ema=True, device="cpu")
    diffusion = GaussianDiffusion(schedule_, "cpu", learn_sigma=model.config.learn_sigma)
    areas = area_index(schedule_)  # (T,) SpeeD's tau for this schedule
    out = {}
    for a, name in enumerate(AREAS):
        steps_in = torch.nonzero(areas == a).flatten()
        g = torch.Generator().manual_seed(seed + a)
        total, count = 0.0, 0
        for _ in range(draws):
            for s in range(0, data.shape[0], 1024):
                x0, c = data[s:s + 1024].float(), [a[s:s + 1024] for a in cond]
                t = steps_in[torch.randint(len(steps_in), (x0.shape[0],), generator=g)]
                eps = torch.randn(x0.shape, generator=g)
                pred, _ = diffusion.split_output(model(diffusion.q_sample(x0, t, eps), t, *c), x0)
                total += ((pred - eps) ** 2).mean(dim=(1, 2, 3)).sum().item()
                count += x0.shape[0]
        out[name] = total / count
    with open(cache, "w") as f:
        json.dump({"checkpoint": os.path.basename(ckpt or ""), "area_mse": out}, f)
    return out


def train_area_loss(run_dir: str, steps: int) -> dict:
    """Mean of the logged per-area training MSE over the last 10% of steps."""
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    tail = [r for r in recs if r["step"] > 0.9 * steps]
    out = {}
    for name in AREAS:
        vals = [r[f"loss_{name}"] for r in tail if r.get(f"loss_{name}") is not None]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def real_floor(data: torch.Tensor, n: int, repeats: int = 5) -> dict:
    """The metric between two disjoint real subsets of n samples each (its floor at this sample size)."""
    from speed_fast.evaluation import frechet_between

    if data.shape[0] < 2 * n:
        n = data.shape[0] // 2
    values = []
    for r in range(repeats):
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(r))
        values.append(frechet_between(data[perm[:n]], data[perm[n:2 * n]]))
    return {"n": n, "repeats": repeats, "values": values, "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1))}


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def _reach(steps, curve, target) -> float:
    s = steps_to_reach(steps, curve, target)
    return math.inf if s is None else s


def ratios_at(steps, base: np.ndarray, arm: np.ndarray) -> list[float]:
    """Acceleration ratio at each of FRACTIONS for seed-mean curves base and arm (ratio 0: never reached)."""
    out = []
    for f in FRACTIONS:
        target = float(base[steps.index(round(f * steps[-1]))])
        out.append(_reach(steps, base, target) / _reach(steps, arm, target))
    return out


def log_auc(steps, curve: np.ndarray) -> float:
    """Mean of log(quality) over the run: trapezoid of log(curve) over steps / the steps it spans."""
    s = np.asarray(steps, dtype=np.float64)
    return float(np.trapezoid(np.log(curve), s) / (s[-1] - s[0]))


MIN_SEEDS = 3  # fewer paired seeds give no usable bootstrap interval


def verdict(low: float, high: float, neutral: float, higher_is_faster: bool, seeds: int) -> str:
    if seeds < MIN_SEEDS:
        return f"too few seeds (< {MIN_SEEDS})"
    if low > neutral:
        return "faster" if higher_is_faster else "slower"
    if high < neutral:
        return "slower" if higher_is_faster else "faster"
    return "no significant difference"


def _interval(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def compare(steps, base: np.ndarray, arm: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """Paired comparison of an arm's curves [S, E] with the baseline's on the same S seeds."""
    S = base.shape[0]
    rng = np.random.default_rng(seed)
    point = ratios_at(steps, base.mean(0), arm.mean(0))
    auc_b = np.array([log_auc(steps, c) for c in base])
    auc_a = np.array([log_auc(steps, c) for c in arm])
    boot_r = np.empty((resamples, len(FRACTIONS)))
    boot_auc = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, S, S)
        boot_r[i] = ratios_at(steps, base[idx].mean(0), arm[idx].mean(0))
        boot_auc[i] = (auc_a[idx] - auc_b[idx]).mean()
    out = {"seeds": S, "thresholds": {}}
    for j, f in enumerate(FRACTIONS):
        ci = _interval(boot_r[:, j])
        per_seed = ratios_at_seeds(steps, base, arm, j)
        out["thresholds"][f"{int(f * 100)}%"] = {
            "target": float(base.mean(0)[steps.index(round(f * steps[-1]))]), "ratio": point[j], "ci95": ci,
            "per_seed": per_seed, "not_reached_frac": float((boot_r[:, j] == 0).mean()),
            "verdict": verdict(ci[0], ci[1], 1.0, higher_is_faster=True, seeds=S)}
    diff = auc_a - auc_b
    ci = _interval(boot_auc)
    out["log_auc"] = {"baseline": float(auc_b.mean()), "arm": float(auc_a.mean()), "diff": float(diff.mean()),
                      "ci95": ci, "per_seed": diff.tolist(), "quality_ratio": float(math.exp(diff.mean())),
                      "verdict": verdict(ci[0], ci[1], 0.0, higher_is_faster=False, seeds=S)}
    out["verdict"] = out["log_auc"]["verdict"]
    return out


def ratios_at_seeds(steps, base: np.ndarray, arm: np.ndarray, j: int) -> list[float | None]:
    """Per-seed ratio at FRACTIONS[j], each seed against its own baseline curve (None: never reached)."""
    out = []
    for b, a in zip(base, arm):
        r = ratios_at(steps, b, a)[j]
        out.append(None if r == 0 else r)
    return out


def curve_band(q: np.ndarray, resamples: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """95% bootstrap band of the seed mean of curves q [S, E]."""
    rng = np.random.default_rng(seed)
    S = q.shape[0]
    means = np.stack([q[rng.integers(0, S, S)].mean(0) for _ in range(min(resamples, 2000))])
    return np.percentile(means, 2.5, axis=0).tolist(), np.percentile(means, 97.5, axis=0).tolist()


def summarize(results: list[dict], arms: dict[str, int], resamples: int) -> dict:
    """Per-arm curve statistics and paired comparisons against the first arm."""
    baseline = next(iter(arms))
    by = {arm: sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"]) for arm in arms}
    steps = by[baseline][0]["steps"]
    for arm, rs in by.items():
        for r in rs:
            if r["steps"] != steps:
                raise ValueError(f"{arm} seed {r['seed']} was evaluated at {r['steps']}, baseline at {steps}")
    summary = {}
    for arm, rs in by.items():
        q = np.array([r["quality"] for r in rs])  # (seeds, evals)
        low, high = curve_band(q, resamples)
        entry = {"strategy": ARMS[arm][0], "params": ARMS[arm][1], "seeds": [r["seed"] for r in rs], "steps": steps,
                 "mean": q.mean(0).tolist(), "band95": [low, high], "final_mean": float(q[:, -1].mean()),
                 "final_ci95": [low[-1], high[-1]],
                 "online_mean": np.array([r["online_quality"] for r in rs]).mean(0).tolist()}
        for key in ("area_mse_heldout", "area_loss_train"):
            entry[key] = {a: float(np.mean([r[key][a] for r in rs if r[key][a] is not None])) for a in AREAS}
        summary[arm] = entry
    base_by_seed = {r["seed"]: r for r in by[baseline]}
    for arm in list(arms)[1:]:
        pairs = [(base_by_seed[r["seed"]], r) for r in by[arm] if r["seed"] in base_by_seed]
        base = np.array([b["quality"] for b, _ in pairs])
        other = np.array([a["quality"] for _, a in pairs])
        summary[arm]["vs_baseline"] = compare(steps, base, other, resamples)
    return summary


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def plot_traces(results: list[dict], path: str, update_every: int = 100) -> str | None:
    """k and tau of every adaptive_speed run against the training step (one line per seed), to
    `path`; None (nothing written) when no run has a trace."""
    runs = [r for r in results if r.get("sampler_trace")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kx, tx) = plt.subplots(1, 2, figsize=(12, 4))
    for r in runs:
        steps = [update_every * (i + 1) for i in range(len(r["sampler_trace"]))]
        kx.plot(steps, [k for k, _ in r["sampler_trace"]], label=f"{r['arm']} seed {r['seed']}")
        tx.plot(steps, [tau for _, tau in r["sampler_trace"]], label=f"{r['arm']} seed {r['seed']}")
    kx.set(xlabel="training step", ylabel="k (suppression of t >= tau)", title="adaptive k")
    tx.set(xlabel="training step", ylabel="tau", title="adaptive tau")
    kx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(summary: dict, arms: list[str], path: str, title: str, floor: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rx, bx) = plt.subplots(1, 3, figsize=(18, 5))
    for arm in arms:
        s = summary[arm]
        line, = ax.plot(s["steps"], s["mean"], marker="o", ms=3, label=f"{arm} (n={len(s['seeds'])})")
        ax.fill_between(s["steps"], *s["band95"], color=line.get_color(), alpha=0.15)
    ax.axhline(floor["mean"], color="black", ls=":", lw=1, label=f"real vs real floor ({floor['n']} each)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{QUALITY} of EMA samples (lower is better)")
    ax.set_title(f"{title}\nseed mean, 95% bootstrap band")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    others = arms[1:]
    width = 0.8 / len(FRACTIONS)
    x = np.arange(len(others))
    for j, f in enumerate(FRACTIONS):
        key = f"{int(f * 100)}%"
        r = [summary[a]["vs_baseline"]["thresholds"][key] for a in others]
        val = np.array([t["ratio"] for t in r])
        lo = np.array([t["ci95"][0] for t in r])
        hi = np.array([t["ci95"][1] for t in r])
        rx.bar(x + j * width, val, width, yerr=[val - lo, hi - val], capsize=2,
               label=f"target: {arms[0]} at {key} of its steps")
    rx.axhline(1.0, color="gray", lw=1)
    rx.set_xticks(x + width * (len(FRACTIONS) - 1) / 2, others, rotation=30, ha="right", fontsize=8)
    rx.set_ylabel(f"acceleration vs {arms[0]} (steps ratio)")
    rx.set_title("acceleration ratio, paired bootstrap 95% CI")
    rx.legend(fontsize=7)
    rx.grid(True, axis="y", alpha=0.3)
    width = 0.8 / len(arms)
    x = np.arange(len(AREAS))
    for i, arm in enumerate(arms):
        bx.bar(x + i * width, [summary[arm]["area_mse_heldout"][a] for a in AREAS], width, label=arm)
    bx.set_xticks(x + width * (len(arms) - 1) / 2, AREAS)
    bx.set_yscale("log")
    bx.set_ylabel("held-out eps MSE of the final EMA model")
    bx.set_title("per-area loss (t uniform within each area)")
    bx.legend(fontsize=7)
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ci(ci, fmt="{:.2f}") -> str:
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def table(summary: dict, arms: list[str]) -> str:
    """The README's Markdown table."""
    base = arms[0]
    head = ["arm", "seeds", f"final {QUALITY} (95% CI)"] + [f"ratio at {base}'s {int(f * 100)}%" for f in FRACTIONS] \
        + ["log-AUC diff (95% CI)", "verdict"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in arms:
        s = summary[arm]
        cells = [arm, str(len(s["seeds"])), f"{s['final_mean']:.3g} {_ci(s['final_ci95'], '{:.3g}')}"]
        if arm == base:
            cells += ["baseline"] * len(FRACTIONS) + ["-", "-"]
        else:
            v = s["vs_baseline"]
            for f in FRACTIONS:
                t = v["thresholds"][f"{int(f * 100)}%"]
                # ratio 0: the arm's seed-mean curve never reaches the baseline's quality at this threshold
                ratio = f"{t['ratio']:.2f}x" if t["ratio"] > 0 else "not reached"
                cells.append(f"{ratio} {_ci(t['ci95'])}")
            cells += [f"{v['log_auc']['diff']:+.3f} {_ci(v['log_auc']['ci95'], '{:+.3f}')}", v["verdict"]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def code_version() -> dict:
    """The commit of the checkout the benchmark runs from, and whether tracked files differ from it
    ({"commit": None} outside a git checkout): what fixes the rules of the adaptive arms a result
    was measured with (a second data set's runs must come from a commit made before them). With
    --finished-only the JSON says `trained_here: false`: the commit is the summariser's, and the
    runs' own code is whatever trained them."""
    import subprocess

    def git(*cmd):
        r = subprocess.run(["git", "-C", ROOT, *cmd], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def finished_arms(args, work_dir: str) -> dict[str, int]:
    """{arm: k} with seeds 0..k-1 finished in work_dir (at most the seeds asked for), arms with none left
    out; SystemExit when the baseline or every other arm has none."""
    done = {}
    for arm, n in args.arms.items():
        k = 0
        while k < n and ((arm, k) in args.reused
                         or is_done(run_dir_for(work_dir, arm, k), expected_train(args, arm, k))):
            k += 1
        if k:
            done[arm] = k
    base = next(iter(args.arms))
    if base not in done or len(done) < 2:
        raise SystemExit(f"[bench] --finished-only: finished runs per arm {done or 'none'}; need the baseline "
                         f"{base!r} and one more arm")
    print(f"[bench] finished runs summarised: {done}", flush=True)
    return done


def sampler_trace(run_dir: str, steps: int) -> list[list[float]] | None:
    """adaptive_speed's (k, tau) after each update, oldest first, from the final checkpoint's
    sampler state (speed_fast.adaptive.AdaptiveSpeedStatistics: row (w - 1) % TRACE holds update w);
    None for a run without one (static strategies, loss_moment)."""
    path = os.path.join(run_dir, "checkpoints", f"step-{steps:08d}", "sampler.pt")
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "trace" not in state:
        return None
    trace, windows = state["trace"], int(state["windows"])
    n = min(windows, trace.shape[0])
    rows = [(windows - n + i) % trace.shape[0] for i in range(n)]  # updates windows-n+1 .. windows
    return [[float(trace[r, 0]), float(trace[r, 1])] for r in rows]


def collect(args, work_dir: str, data, cond: tuple, walls: dict) -> list[dict]:
    results = []
    for arm, seed in schedule(args):
        if (arm, seed) in args.reused:
            results.append(args.reused[(arm, seed)])
            continue
        rd = run_dir_for(work_dir, arm, seed)
        metrics = os.path.join(rd, "metrics.jsonl")
        _, steps, quality = read_quality(metrics, QUALITY)
        _, online_steps, online = read_quality(metrics, f"online_{QUALITY}")
        if online_steps != steps:
            raise ValueError(f"{rd}: online evaluations at {online_steps}, EMA at {steps}")
        results.append({"arm": arm, "seed": seed, "run_dir": os.path.relpath(rd, ROOT), "steps": steps,
                        "quality": quality, "online_quality": online, "final": quality[-1],
                        "wall_s": walls.get(f"{arm}-seed{seed}"),
                        "area_mse_heldout": heldout_area_mse(rd, data, cond),
                        "area_loss_train": train_area_loss(rd, args.steps),
                        "sampler_trace": sampler_trace(rd, args.steps)})
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    stem = out[:-5] if out.endswith(".json") else out
    work_dir = os.path.abspath(args.work_dir or stem + ".runs")
    os.makedirs(work_dir, exist_ok=True)
    start = time.perf_counter()
    beton, data, cond = prepare_data(args.dataset)
    try:
        args.reused = load_reused(args)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"[bench] {exc}")
    if args.reused:
        print(f"[bench] reused from {args.reuse}: {len(args.reused)} runs "
              f"({', '.join(f'{a}-seed{s}' for a, s in sorted(args.reused))})", flush=True)
    if args.finished_only:
        args.arms = finished_arms(args, work_dir)
        walls = {}
    else:
        walls = run_all(args, beton, work_dir)
    results = collect(args, work_dir, data, cond, walls)
    summary = summarize(results, args.arms, args.bootstrap)
    floor = real_floor(data, args.eval_samples)
    arms = list(args.arms)
    png = args.plot or stem + ".png"
    plot(summary, arms, png, f"{args.dataset}: {args.steps} steps", floor)
    traces_png = plot_traces(results, png[:-4] + "_adaptive.png" if png.endswith(".png") else png + "_adaptive.png")
    doc = {"meta": {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if argv is None
                    else " ".join(argv), "dataset": args.dataset, "arms": {a: {"seeds": n, "strategy": ARMS[a][0],
                                                                               "params": ARMS[a][1]}
                                                                           for a, n in args.arms.items()},
                    "baseline": arms[0], "steps": args.steps, "eval_every": args.eval_every,
                    "eval_samples": args.eval_samples, "preset": args.preset, "model": args.model, "trainer_args": args.trainer_arg,
                    "reused": args.reuse,
                    "jobs": args.jobs, "bootstrap": args.bootstrap, "fractions": list(FRACTIONS),
                    "machine": machine(), "code": {**code_version(), "trained_here": not args.finished_only}, "wall_s": time.perf_counter() - start, "plot": os.path.relpath(png, ROOT),
                    "plot_adaptive": os.path.relpath(traces_png, ROOT) if traces_png else None,
                    "quality_key": QUALITY, "real_floor": floor},
           "seeds": {a: summary[a]["seeds"] for a in arms}, "summary": summary, "results": results,
           "table": table(summary, arms)}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(doc["table"])
    print(f"\nreal-vs-real floor ({floor['n']} vs {floor['n']}): {floor['mean']:.4g} ± {floor['std']:.2g}")
    print(f"wrote {out} and {png} ({doc['meta']['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
