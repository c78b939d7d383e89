"""What a run leaves in its directory besides checkpoints and metrics.jsonl (those are
`checkpoint.py` and `metrics.py`): config.json at the start, and at the end the EMA sample
grid, the loss plot and the quality plot. Also the training-time evaluator's set-up (its
reference set is drawn from the training data). Everything here runs on rank 0, except
`ema_model`, which gathers the EMA, and the evaluator, which samples on every rank (both collective).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from ..models.registry import build_model, config_key, is_text_model
from .checkpoint import write_atomic
from .config import Plan
from .metrics import plot_loss, read_metrics


def write_config(run_dir: str, plan: Plan, fused_backend: str, num_params: int) -> str:
    """<run_dir>/config.json: everything that defines the run, and the versions that ran it."""
    doc = {
        "train": plan.cfg.to_dict(),
        config_key(plan.model): plan.model.to_dict(),  # "dit_config" or "unet_config"
        "strategy": plan.strategy.describe(),
        "schedule": plan.schedule.describe(),
        "data_path": plan.data_path,
        "data_meta": plan.data_meta,
        "world_size": plan.world_size,
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "precision": plan.precision,
        "fused_backend": fused_backend,
        "deepspeed": plan.ds_config,
        "num_params": num_params,
        "versions": versions(),
    }
    path = os.path.join(run_dir, "config.json")
    write_atomic(path, json.dumps(doc, indent=1, default=str))
    return path


def versions() -> dict:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]}


def ema_model(plan: Plan, ema, rank: int, device, everywhere: bool = False, online: bool = False):
    """A plain fp32 model (DiT or U-Net) with the EMA weights (online=True: the raw master weights), on `device`: on
    rank 0 only (None elsewhere), or on every rank with `everywhere` (distributed evaluation).
    Collective: every rank calls it."""
    gather = ema.full_master_state_dict if online else ema.full_state_dict
    sd = gather(dst=None if everywhere else 0, device=device)
    if not sd:
        return None
    model = build_model(plan.model).to(device)
    model.load_state_dict(sd)
    return model.eval()


def make_evaluator(plan: Plan, rank: int, device, torch_threads: int):
    """The training-time evaluator of one rank (every rank samples its share of the set, see
    `TrainingEvaluator`): a fixed-seed sample set against a reference set drawn from the training
    data on rank 0 (max(4 x eval_samples, 2048) latents, at most the whole file). A text-to-image
    model's sample i is conditioned on the caption of reference record i (every rank reads them)."""
    from ..evaluation import TrainingEvaluator, eval_sampling

    cfg = plan.cfg
    reference = text = None
    if rank == 0 or is_text_model(plan.model):
        n = min(plan.data_meta["num_samples"], max(4 * cfg.eval_samples, 2048))
        batch = data_batch(plan, n, seed=cfg.seed + 1)
        torch.set_num_threads(torch_threads)  # FFCV sets torch's thread count per epoch
        reference = batch[0] if rank == 0 else None
        if is_text_model(plan.model):
            text = tuple(a[:cfg.eval_samples].clone() for a in batch[2:])
    return TrainingEvaluator(reference, plan.schedule, n_samples=cfg.eval_samples, seed=cfg.seed, device=device,
                             learn_sigma=plan.model.learn_sigma, shape=tuple(plan.data_meta["shape"]), rank=rank,
                             world=plan.world_size, text=text,
                             **eval_sampling(plan.data_meta, cfg.eval_sampler, cfg.eval_clip))


def data_batch(plan: Plan, n: int, seed: int) -> tuple:
    """n records of the training data in the order of `seed` (one loader batch, float32): (x, y), or
    (x, y, tokens, pooled) for a captioned file."""
    from ..data import open_loader

    loader = open_loader(plan.data_path, n, loader=plan.loader, seed=seed, num_workers=1, drop_last=True,
                         out_dtype=torch.float32)
    return tuple(a.clone() for a in next(iter(loader)))


class GridStopped(Exception):
    """A stop signal arrived while the end-of-run grid was drawn."""


def grid_sampler(plan: Plan, n: int) -> tuple[str, str, str]:
    """(steps, method, why) of the end-of-run grid: --sample-steps (DDPM) while its n x steps model
    calls stay within the run's own work (3 x max_steps x global_batch sample passes: forward and
    backward); else the evaluation sampler when it is cheaper; else DDIM with as many steps as
    that work allows (at least 2). A 2-step run no longer spends minutes on a 250-step grid."""
    from ..evaluation.policy import sampler_method
    from ..sampling import space_timesteps

    cfg = plan.cfg
    budget = 3 * cfg.max_steps * cfg.global_batch

    def calls(spec) -> int:
        return n * len(space_timesteps(plan.schedule.T, spec))

    if calls(cfg.sample_steps) <= budget:
        return cfg.sample_steps, "ddpm", ""
    note = f" (--sample-steps {cfg.sample_steps} would take {calls(cfg.sample_steps)} model calls, more than " \
           f"this run's {budget} sample passes of training)"
    if calls(cfg.eval_sampler) < calls(cfg.sample_steps) and calls(cfg.eval_sampler) <= budget:
        return cfg.eval_sampler, sampler_method(cfg.eval_sampler), note + "; the evaluation sampler instead"
    steps = str(max(2, min(budget // n, len(space_timesteps(plan.schedule.T, cfg.sample_steps)))))
    return steps, "ddim", note + "; fewer DDIM steps instead"


def finish(plan: Plan, run_dir: str, model, device) -> list[str]:
    """End of run on rank 0: the EMA sample grid (samples.png, or samples.npz for latents), loss.png
    and, with --eval-every, quality.png. Returns the paths written."""
    from .. import sampling

    from . import preemption

    cfg = plan.cfg
    C = plan.model.in_channels
    if is_text_model(plan.model):  # the captions of 64 training records (the order of seed + 1)
        from ..data import null_text

        n = min(64, plan.data_meta["num_samples"])
        _, labels, tokens, pooled = data_batch(plan, n, seed=cfg.seed + 1)
        conditions = {"text": (tokens, pooled), "null_text": null_text(plan.data_meta)}
        per_class = 8
    else:
        K = plan.model.num_classes
        per_class = 10 if K <= 10 else 1
        labels = torch.arange(min(K, 64)).repeat_interleave(per_class)  # (n,)
        conditions = {"y": labels}
    steps, method, why = grid_sampler(plan, labels.numel())
    what = " (captions of training records)" if "text" in conditions else ""
    print(f"[speed_fast] drawing the end-of-run sample grid: {labels.numel()} EMA samples{what}, {method} "
          f"{steps} steps{why} (a stop signal skips it)", file=sys.stderr, flush=True)

    def stop_requested(module, args):
        if preemption.requested():
            raise GridStopped(preemption.reason())

    hook = model.register_forward_pre_hook(stop_requested)  # checked before every model call
    try:
        x = sampling.sample(model, plan.schedule, labels.numel(), **conditions, steps=steps, method=method,
                            cfg_scale=cfg.sample_cfg, seed=cfg.seed, device=device,
                            batch_size=min(labels.numel(), 128), learn_sigma=plan.model.learn_sigma)
    except GridStopped as stop:
        # The checkpoint is safe already: end now, without the grid (speed-fast sample draws it later).
        print(f"[speed_fast] {stop} arrived while drawing the sample grid: skipped it", file=sys.stderr, flush=True)
        return [f"skipped ({stop})", plot_loss(os.path.join(run_dir, "metrics.jsonl"),
                                               os.path.join(run_dir, "loss.png"),
                                               title=f"{cfg.preset}: {plan.strategy.describe()['name']}")]
    finally:
        hook.remove()
    if C in (1, 3):
        grid = sampling.save_grid(x, os.path.join(run_dir, "samples.png"), nrow=per_class if per_class > 1 else 8)
    else:  # latents: decoding needs the VAE (speed-fast sample --ckpt RUN_DIR)
        grid = os.path.join(run_dir, "samples.npz")
        np.savez(grid, latents=x.numpy(), labels=labels.numpy())
    metrics = os.path.join(run_dir, "metrics.jsonl")
    paths = [grid, plot_loss(metrics, os.path.join(run_dir, "loss.png"),
                             title=f"{cfg.preset}: {plan.strategy.describe()['name']}")]
    if cfg.eval_every:  # a run shorter than --eval-every has no quality record to plot
        from ..evaluation import QUALITY_KEYS, plot_quality

        if any(key in rec for rec in read_metrics(metrics) for key in QUALITY_KEYS):
            paths.append(plot_quality(metrics, os.path.join(run_dir, "quality.png")))
    return paths
