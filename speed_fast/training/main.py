"""Entry point behind `deepspeed train/main.py`: parse, validate on every rank, then train.

Exit codes: 0 trained to max_steps, or stopped by SIGTERM/SIGINT after saving a checkpoint;
2 invalid configuration (nothing started); 3 stopped by repeated non-finite losses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

from . import checkpoint as ckpt
from .config import ConfigError, Plan, TrainConfig, parse_args, resolve

# Keys whose change makes a checkpoint's continuation a different run.
_IDENTITY = ("model", "dit", "data", "flip", "schedule", "strategy", "strategy_params", "global_batch", "micro_batch",
             "seed", "zero_stage", "precision", "init_from")


def _dist_env(local_rank_flag: int | None) -> tuple[int, int, int]:
    """(rank, world, local_rank) from the launcher's environment; a single process without a
    launcher gets a one-rank group on a free local port."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank_flag or 0),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("LOCAL_RANK", str(local_rank_flag or 0))
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"launcher environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None


def _check_device(local_rank: int, use_cuda: bool) -> None:
    import torch

    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA devices "
                          "(launch at most one process per GPU per node)")


def _resume_path(cfg: TrainConfig, plan: Plan) -> str | None:
    root = os.path.join(cfg.run_dir, "checkpoints")
    path = ckpt.find_latest(root)
    if cfg.resume == "never":
        if path is not None:
            raise ConfigError(f"--resume never, but {cfg.run_dir} already holds checkpoint {path}; "
                              "choose another --run-dir or resume")
        return None
    if path is None:
        if cfg.resume == "must":
            raise ConfigError(f"--resume: no complete checkpoint under {root}")
        return None
    with open(os.path.join(cfg.run_dir, "config.json")) as f:
        old = json.load(f)
    before, after = old["train"], cfg.to_dict()
    changed = {k: (before.get(k), after[k]) for k in _IDENTITY if before.get(k) != after[k]}
    if changed:
        raise ConfigError(f"cannot resume {cfg.run_dir}: the run was started with different settings "
                          f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in changed.items()} }; use another --run-dir")
    state = ckpt.read_state(path)
    if state["world_size"] != plan.world_size:
        raise ConfigError(f"cannot resume {path}: written by {state['world_size']} ranks, this job has "
                          f"{plan.world_size} (exact resume needs the same world size)")
    return path


def main(argv: list[str], configs_dir: str) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg, ns = parse_args(argv, configs_dir)
        rank, world, local_rank = _dist_env(ns.local_rank)
        import torch

        # DS_ACCELERATOR=cpu (DeepSpeed's own switch) keeps a run on the CPU of a GPU machine.
        use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
        plan = resolve(cfg, world, configs_dir, use_cuda)
        _check_device(local_rank, use_cuda)
        resume_from = _resume_path(cfg, plan)
    except ConfigError as exc:
        if rank == 0:
            print(f"train/main.py: error: {exc}", file=sys.stderr, flush=True)
        return 2

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from .trainer import NonFiniteLossError, Trainer

    trainer = Trainer(plan, rank, local_rank, resume_from=resume_from)
    if rank == 0 and resume_from is not None:
        print(f"[speed_fast] resuming from {resume_from} (step {trainer.step})", file=sys.stderr, flush=True)
    try:
        return trainer.fit()
    except NonFiniteLossError as exc:
        if rank == 0:
            print(f"train/main.py: {exc}", file=sys.stderr, flush=True)
        return 3
