"""Convergence benchmark: does SpeeD reach the baseline's sample quality in fewer steps?

    python benchmarks/bench_convergence.py --dataset digits --strategies uniform,speed,min_snr,p2 \
        --steps 1000 --seeds 3 --eval-every 100 --out convergence.json

For every seed and strategy it trains with the project's trainer (`train/main.py --preset
digits --strategy S --max-steps N --seed K --run-dir D --data PATH.beton --eval-every E`, one
subprocess each, so every strategy starts from the same init, data order and noise stream for
a given seed). The trainer evaluates the EMA model every E steps on rank 0
(`speed_fast.evaluation.TrainingEvaluator`: a fixed-seed DDIM sample set vs the training data,
Fréchet distance on the raw data, "fd_raw", lower is better) and logs it to metrics.jsonl.

Reported:
* quality vs step per strategy (mean over seeds, min-max band) -> JSON and a PNG;
* acceleration ratio vs the baseline (first strategy, normally uniform): target = the
  baseline's final seed-mean quality; ratio = steps the baseline needs to first reach it /
  steps the strategy needs, both linearly interpolated between evaluations
  (`speed_fast.evaluation.acceleration_ratio`). "not reached" when the strategy never gets
  there within the run; per-seed ratios are listed too;
* per-area losses (acceleration / deceleration / convergence, `speed_fast.theory.area_index`
  with SpeeD's tau): the unweighted eps-MSE of each final EMA model on the whole dataset with t
  uniform inside each area and a fixed noise draw (the same t and noise for every strategy),
  plus the training log's per-area MSE over the last 10% of steps.

--dataset digits uses the embedded digits .beton; an .npy/.npz of images or latents
([N, C, H, W], [N, H, W] or NHWC; uint8 images are mapped to [-1, 1]; labels from an "labels"
or "y" array in an .npz, else one class) is written once with `speed_fast.data.write_latents`.
Runs already complete in --work-dir (same strategy, seed, steps) are reused, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from speed_fast.evaluation import acceleration_ratio, load_array, read_quality  # noqa: E402
from speed_fast.theory import AREAS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", help="'digits' or an .npy/.npz array of images or latents")
    p.add_argument("--strategies", default="uniform,speed,min_snr,p2", help="comma-separated; the first is the baseline")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 per strategy")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--eval-sampler", default="ddim25")
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="EMA decay of the evaluated model (the preset's 0.999 lags ~1000 steps behind short runs)")
    p.add_argument("--preset", default="digits")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores / jobs threads)")
    p.add_argument("--work-dir", default=None, help="run directories (default: <out without .json>.runs)")
    p.add_argument("--trainer-arg", action="append", default=[], help="extra flag for train/main.py (repeatable)")
    p.add_argument("--out", required=True, help="JSON output; the plot goes next to it as .png")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if len(args.strategies) < 2:
        p.error(f"--strategies needs a baseline and at least one more strategy, got {args.strategies}")
    for name in ("steps", "seeds", "eval_every", "eval_samples", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.eval_every:
        p.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    return args


def prepare_data(dataset: str, work_dir: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(.beton path, data [N, C, H, W], labels [N]) for 'digits' or an .npy/.npz file."""
    if dataset == "digits":
        from speed_fast.data import ensure_digits_beton
        from speed_fast.data.digits import digits_arrays

        x, y = digits_arrays()
        return ensure_digits_beton(), torch.from_numpy(x), torch.from_numpy(y)
    from speed_fast.data import read_latent_meta, write_latents
    from speed_fast.data.latents import LatentFileError

    x, y = load_array(dataset)
    if y is None:
        y = torch.zeros(x.shape[0], dtype=torch.int64)
    path = os.path.join(work_dir, "data.beton")
    source = {"dataset": os.path.abspath(dataset), "mtime": os.path.getmtime(dataset)}
    try:
        current = read_latent_meta(path).get("source") == source
    except LatentFileError:
        current = False
    if not current:
        num_classes = int(y.max()) + 1
        write_latents(path, x, y.numpy(), class_names=[str(i) for i in range(num_classes)], store_dtype="float32",
                      extra=source)
    return path, x, y


def run_dir_for(work_dir, strategy, seed):
    return os.path.join(work_dir, f"{strategy}-seed{seed}")


def is_done(run_dir: str, strategy: str, seed: int, steps: int) -> bool:
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            train = json.load(f)["train"]
        _, s, _ = read_quality(os.path.join(run_dir, "metrics.jsonl"), "fd_raw")
    except (OSError, ValueError, KeyError):
        return False
    return train["strategy"] == strategy and train["seed"] == seed and train["max_steps"] == steps and s[-1] == steps


def trainer_command(args, beton, strategy, seed, run_dir):
    return [sys.executable, os.path.join(ROOT, "train", "main.py"), "--preset", args.preset, "--strategy", strategy,
            "--max-steps", str(args.steps), "--seed", str(seed), "--run-dir", run_dir, "--data", beton,
            "--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples),
            "--eval-sampler", args.eval_sampler, "--ema-decay", str(args.ema_decay), "--ckpt-every",
            str(args.steps), "--sample-steps", "50", "--resume", "never", "--no-progress", *args.trainer_arg]


def run_all(args, beton, work_dir) -> dict:
    """Train every (strategy, seed) not already done, `args.jobs` at a time; returns wall seconds per run."""
    todo = [(st, seed) for seed in range(args.seeds) for st in args.strategies
            if not is_done(run_dir_for(work_dir, st, seed), st, seed, args.steps)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running, walls = [], {}
    while todo or running:
        while todo and len(running) < args.jobs:
            st, seed = todo.pop(0)
            rd = run_dir_for(work_dir, st, seed)
            os.makedirs(rd, exist_ok=True)
            cmd = trainer_command(args, beton, st, seed, rd)
            log = open(os.path.join(rd, "train.log"), "w")
            print(f"[bench] start {st} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            running.append((st, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                       cwd=ROOT), log, time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            st, seed, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            walls[f"{st}-seed{seed}"] = time.perf_counter() - t0
            if proc.returncode != 0:
                for _, _, other, _, _ in running:
                    other.terminate()
                tail = open(os.path.join(run_dir_for(work_dir, st, seed), "train.log")).read()[-3000:]
                raise SystemExit(f"[bench] {st} seed {seed} failed (exit {proc.returncode}):\n{tail}")
            print(f"[bench] done  {st} seed {seed} in {walls[f'{st}-seed{seed}']:.0f} s", flush=True)
    return walls


@torch.no_grad()
def heldout_area_mse(run_dir: str, data: torch.Tensor, labels: torch.Tensor, draws: int = 2,
                     seed: int = 1234) -> dict:
    """Unweighted eps-MSE of the run's final EMA model per area, t uniform within each area,
    the same (t, noise) for every run (fixed generator)."""
    from speed_fast.diffusion import GaussianDiffusion
    from speed_fast.theory import area_index
    from speed_fast.training.checkpoint import load_for_inference

    model, _, schedule, _ = load_for_inference(run_dir, ema=True, device="cpu")
    diffusion = GaussianDiffusion(schedule, "cpu", learn_sigma=model.config.learn_sigma)
    areas = area_index(schedule)  # (T,) SpeeD's tau for this schedule
    out = {}
    for a, name in enumerate(AREAS):
        steps_in = torch.nonzero(areas == a).flatten()
        g = torch.Generator().manual_seed(seed + a)
        total, count = 0.0, 0
        for _ in range(draws):
            for s in range(0, data.shape[0], 1024):
                x0, y = data[s:s + 1024].float(), labels[s:s + 1024]
                t = steps_in[torch.randint(len(steps_in), (x0.shape[0],), generator=g)]
                eps = torch.randn(x0.shape, generator=g)
                pred, _ = diffusion.split_output(model(diffusion.q_sample(x0, t, eps), t, y), x0)
                total += ((pred - eps) ** 2).mean(dim=(1, 2, 3)).sum().item()
                count += x0.shape[0]
        out[name] = total / count
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


def summarize(results: list[dict], strategies: list[str]) -> dict:
    """Seed statistics of each strategy's quality curve and its acceleration vs strategies[0]."""
    baseline = strategies[0]
    by = {st: [r for r in results if r["strategy"] == st] for st in strategies}
    steps = by[baseline][0]["steps"]
    for st, rs in by.items():
        for r in rs:
            if r["steps"] != steps:
                raise ValueError(f"{st} seed {r['seed']} was evaluated at {r['steps']}, baseline at {steps}")
    summary = {}
    for st, rs in by.items():
        q = np.array([r["quality"] for r in rs])  # (seeds, evals)
        entry = {"steps": steps, "mean": q.mean(0).tolist(), "std": q.std(0).tolist(), "min": q.min(0).tolist(),
                 "max": q.max(0).tolist(), "final_mean": float(q[:, -1].mean()), "final_std": float(q[:, -1].std()),
                 "seeds": len(rs)}
        for key in ("area_mse_heldout", "area_loss_train"):
            entry[key] = {a: float(np.mean([r[key][a] for r in rs if r[key][a] is not None])) for a in AREAS}
        summary[st] = entry
    base_mean = summary[baseline]["mean"]
    for st in strategies[1:]:
        summary[st]["acceleration"] = acceleration_ratio(steps, base_mean, summary[st]["mean"])
        per_seed = []
        for r in by[st]:
            b = next(x for x in by[baseline] if x["seed"] == r["seed"])
            per_seed.append(acceleration_ratio(steps, b["quality"], r["quality"])["ratio"])
        summary[st]["per_seed_ratio"] = per_seed
    return summary


def plot(summary: dict, strategies: list[str], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for st in strategies:
        s = summary[st]
        line, = ax.plot(s["steps"], s["mean"], marker="o", ms=3, label=f"{st} (n={s['seeds']})")
        ax.fill_between(s["steps"], s["min"], s["max"], color=line.get_color(), alpha=0.2)
    target = summary[strategies[0]]["final_mean"]
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"{strategies[0]} final")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("fd_raw of EMA samples (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    width = 0.8 / len(strategies)
    x = np.arange(len(AREAS))
    for i, st in enumerate(strategies):
        bx.bar(x + i * width, [summary[st]["area_mse_heldout"][a] for a in AREAS], width, label=st)
    bx.set_xticks(x + width * (len(strategies) - 1) / 2, AREAS)
    bx.set_yscale("log")
    bx.set_ylabel("held-out eps MSE of the final EMA model")
    bx.set_title("per-area loss (t uniform within each area)")
    bx.legend(fontsize=8)
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt_ratio(acc: dict | None) -> str:
    if acc is None:
        return "baseline"
    if not acc["reached"]:
        return "not reached"
    return f"{acc['ratio']:.2f}x ({acc['baseline_steps']:.0f}/{acc['method_steps']:.0f})"


def print_table(summary: dict, strategies: list[str]) -> None:
    base = strategies[0]
    print(f"\nquality = fd_raw of EMA samples (lower is better); target = {base}'s final "
          f"{summary[base]['final_mean']:.4g}")
    head = (f"{'strategy':<10} {'final (mean ± std)':>20} {'acceleration vs ' + base:>28} {'per-seed ratios':>22}  "
            f"{'held-out MSE acc / dec / conv':>30}  {'train MSE acc / dec / conv':>28}")
    print(head)
    print("-" * len(head))
    for st in strategies:
        s = summary[st]
        per_seed = ", ".join("n/r" if r is None else f"{r:.2f}" for r in s.get("per_seed_ratio", [])) or "-"
        ho = " / ".join(f"{s['area_mse_heldout'][a]:.4f}" for a in AREAS)
        tr = " / ".join("nan" if s["area_loss_train"][a] is None else f"{s['area_loss_train'][a]:.4f}"
                        for a in AREAS)
        print(f"{st:<10} {s['final_mean']:>11.4g} ± {s['final_std']:<7.3g} {_fmt_ratio(s.get('acceleration')):>28} "
              f"{per_seed:>22}  {ho:>30}  {tr:>28}")


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    work_dir = os.path.abspath(args.work_dir or (out[:-5] if out.endswith(".json") else out) + ".runs")
    os.makedirs(work_dir, exist_ok=True)
    start = time.perf_counter()
    beton, data, labels = prepare_data(args.dataset, work_dir)
    walls = run_all(args, beton, work_dir)
    results = []
    for seed in range(args.seeds):
        for st in args.strategies:
            rd = run_dir_for(work_dir, st, seed)
            _, steps, quality = read_quality(os.path.join(rd, "metrics.jsonl"), "fd_raw")
            results.append({"strategy": st, "seed": seed, "run_dir": rd, "steps": steps, "quality": quality,
                            "final": quality[-1], "wall_s": walls.get(f"{st}-seed{seed}"),
                            "area_mse_heldout": heldout_area_mse(rd, data, labels),
                            "area_loss_train": train_area_loss(rd, args.steps)})
    summary = summarize(results, args.strategies)
    png = args.plot or (out[:-5] if out.endswith(".json") else out) + ".png"
    plot(summary, args.strategies, png, f"{args.dataset}: {args.steps} steps, {args.seeds} seeds")
    doc = {"meta": {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if argv is None
                    else " ".join(argv), "dataset": args.dataset, "beton": beton, "strategies": args.strategies,
                    "baseline": args.strategies[0], "steps": args.steps, "seeds": args.seeds,
                    "eval_every": args.eval_every, "eval_samples": args.eval_samples,
                    "eval_sampler": args.eval_sampler, "ema_decay": args.ema_decay, "preset": args.preset,
                    "trainer_args": args.trainer_arg, "jobs": args.jobs, "machine": machine(),
                    "wall_s": time.perf_counter() - start, "plot": png, "quality_key": "fd_raw"},
           "summary": summary, "results": results}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print_table(summary, args.strategies)
    print(f"\nwrote {out} and {png} ({doc['meta']['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
