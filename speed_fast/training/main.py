"""Entry point behind `deepspeed train/main.py`: parse, validate on every rank, lock the run, then train.

Order: every rank parses and validates the whole configuration (speed_fast.training.config.resolve);
rank 0 locks the run directory (speed_fast.training.runlock); every rank picks the newest
checkpoint that verifies and checks that it continues this run (settings, data file, world size,
--max-steps); only then does the process group start. A rank > 0 that finds an error waits a
moment before it exits, so that rank 0, which found the same error, prints it before the
launcher stops the job (the launcher kills the other ranks when the first one exits); a rank > 0
that is still alive after ERROR_GRACE_S prints the error itself.

Exit codes: 0 trained to max_steps, or stopped by SIGTERM/SIGINT (or the launcher's death) after
saving a checkpoint; 2 invalid configuration, run directory in use, or a checkpoint that cannot
be resumed (nothing trained); 3 stopped by repeated non-finite losses.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from ..jsonfile import JSONFileError, read_json_object
from . import checkpoint as ckpt
from . import preemption
from .config import ConfigError, Plan, TrainConfig, parse_args, resolve
from .runlock import RunDirLocked, RunLock

# Keys whose change makes a checkpoint's continuation a different run (compared as written in
# config.json's "train"); the data file, ZeRO stage and precision are compared by what they are
# (content fingerprint, effective stage and precision), not by how they were spelled.
_IDENTITY = ("model", "dit", "unet", "t2i", "caption_dropout", "flip", "schedule", "strategy", "strategy_params",
             "global_batch", "micro_batch", "seed", "init_from")
ERROR_GRACE_S = 10.0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


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


def _probe_attention(plan: Plan, local_rank: int, use_cuda: bool) -> None:
    """One real call of the attention backend on this rank's device (an xformers that is missing or
    built for another torch/GPU fails here, before the process group, not in the first step)."""
    import torch

    from ..models.registry import probe_model_attention

    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    try:
        probe_model_attention(plan.model, device)
    except ValueError as exc:
        raise ConfigError(f"--attn-backend {plan.cfg.attn_backend}: {exc}") from None


def _data_identity(meta: dict) -> dict:
    """The comparable identity of a data file from a config.json's data_meta (the fingerprint of
    speed_fast.data.latents without the path; runs recorded before it: the file size)."""
    fp = meta.get("fingerprint")
    if fp:
        return {k: v for k, v in fp.items() if k != "path"}
    return {"bytes": meta.get("file_bytes")}


def _changed_settings(old: dict, plan: Plan) -> dict:
    before, after = old.get("train", {}), plan.cfg.to_dict()
    default = TrainConfig().to_dict()  # a setting newer than the run's config.json (e.g. unet) had its default
    changed = {k: f"{before.get(k, default[k])!r} -> {after[k]!r}" for k in _IDENTITY
               if before.get(k, default[k]) != after[k]}
    old_stage = old.get("deepspeed", {}).get("zero_optimization", {}).get("stage", before.get("zero_stage"))
    new_stage = plan.ds_config["zero_optimization"]["stage"]
    if old_stage != new_stage:
        changed["zero_stage"] = f"{old_stage!r} -> {new_stage!r}"
    old_precision = old.get("precision", before.get("precision"))
    if old_precision != plan.precision:
        changed["precision"] = f"{old_precision!r} -> {plan.precision!r}"
    old_data, new_data = _data_identity(old.get("data_meta", {})), _data_identity(plan.data_meta)
    if old_data != {k: new_data.get(k) for k in old_data}:
        changed["data"] = (f"{old.get('data_path')!r} -> {plan.data_path!r} (another file: its size, header, "
                           "record index or provenance differ)")
    return changed


def _resume_path(cfg: TrainConfig, plan: Plan, rank: int) -> str | None:
    """The checkpoint to resume from (None: start fresh); raises ConfigError when the run directory
    holds checkpoints this job must not or cannot continue."""
    root = os.path.join(cfg.run_dir, "checkpoints")
    tags = ckpt.checkpoint_tags(root)
    if cfg.resume == "never":
        if tags:
            raise ConfigError(f"--resume never, but {cfg.run_dir} already holds checkpoint(s) {tags}; "
                              "choose another --run-dir or resume")
        return None
    if not tags:
        if cfg.resume == "must":
            raise ConfigError(f"--resume: no complete checkpoint under {root}")
        return None
    path, state, skipped = ckpt.find_resumable(root)
    if rank == 0:
        for tag, why in skipped:
            _say(f"[speed_fast] skipping checkpoint {tag}: {why}")
    if path is None:
        raise ConfigError(f"cannot resume {cfg.run_dir}: none of its checkpoints {tags} verifies (reasons above); "
                          f"move the damaged ones out of {root} to start over, or choose another --run-dir")
    try:
        old = read_json_object(os.path.join(cfg.run_dir, "config.json"))
    except JSONFileError as exc:
        raise ConfigError(f"cannot resume {cfg.run_dir}: {exc}") from None
    changed = _changed_settings(old, plan)
    if changed:
        raise ConfigError(f"cannot resume {cfg.run_dir}: the run was started with different settings "
                          f"{changed}; use another --run-dir")
    if state["world_size"] != plan.world_size:
        raise ConfigError(f"cannot resume {path}: written by {state['world_size']} ranks, this job has "
                          f"{plan.world_size} (exact resume needs the same world size)")
    if cfg.max_steps < state["step"]:
        raise ConfigError(f"--max-steps {cfg.max_steps} is below step {state['step']} of the checkpoint {path}; "
                          f"a run cannot be shortened after the fact (use --max-steps >= {state['step']}, or "
                          "another --run-dir)")
    return path


def _fail(message: str, rank: int, world: int) -> int:
    """Print a start-up error where the user sees it and return 2 (see the module docstring)."""
    if rank != 0 and world > 1:
        time.sleep(ERROR_GRACE_S)  # rank 0 reports it (the launcher ends this process meanwhile)
        message = f"(rank {rank}) {message}"
    _say(f"train/main.py: error: {message}")
    return 2


def _agree_on_step(step: int, world: int) -> None:
    """Every rank resumed from the same step (they chose before the process group existed)."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    t = torch.tensor([step, -step], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ConfigError(f"the ranks resumed from different checkpoints (steps {-int(t[1])} to {int(t[0])}): the "
                          "run directory changed while the job started (another trainer was finishing?); run again")


def _check_engine(engine, plan: Plan) -> None:
    """What DeepSpeed runs is what config.json records and a resume compares (stage, precision)."""
    import torch

    bf16 = engine.bfloat16_enabled() or (engine.torch_autocast_enabled()
                                         and engine.torch_autocast_dtype() == torch.bfloat16)
    ran = {"zero_stage": engine.zero_optimization_stage(), "precision": "bf16" if bf16 else "fp32"}
    planned = {"zero_stage": plan.ds_config["zero_optimization"]["stage"], "precision": plan.precision}
    if ran != planned:
        raise ConfigError(f"DeepSpeed runs {ran} but the run's configuration says {planned}")


def main(argv: list[str], configs_dir: str) -> int:
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    lock = None
    try:
        cfg, ns = parse_args(argv, configs_dir)
        rank, world, local_rank = _dist_env(ns.local_rank)
        import torch

        # DS_ACCELERATOR=cpu (DeepSpeed's own switch) keeps a run on the CPU of a GPU machine.
        use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
        plan = resolve(cfg, world, configs_dir, use_cuda)
        _check_device(local_rank, use_cuda)
        _probe_attention(plan, local_rank, use_cuda)
        if rank == 0:
            if plan.loader_note:
                _say(f"[speed_fast] {plan.loader_note}")
            lock = RunLock(cfg.run_dir).acquire()
            if not lock.supported:
                _say(f"[speed_fast] warning: {cfg.run_dir} is on a file system without fcntl locks; nothing stops "
                     "a second trainer on this run directory")
            elif lock.took_over:
                _say(f"[speed_fast] took over the run directory's lock from {lock.took_over}, which is gone")
        resume_from = _resume_path(cfg, plan, rank)
    except (ConfigError, RunDirLocked) as exc:
        if lock is not None:
            lock.release(cleanup=True)
        return _fail(str(exc), rank, world)

    preemption.install()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from .trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(plan, rank, local_rank, resume_from=resume_from)
        _agree_on_step(trainer.step, world)
        _check_engine(trainer.engine, plan)
    except (ckpt.CheckpointError, ConfigError) as exc:
        # A file that passed verification but cannot be loaded (refused as unsafe, or not what it
        # claims): every rank that reads it says so.
        _say(f"train/main.py: error: {f'(rank {rank}) ' if world > 1 else ''}{exc}")
        return 2
    if rank == 0 and resume_from is not None:
        _say(f"[speed_fast] resuming from {resume_from} (step {trainer.step})")
    try:
        return trainer.fit()
    except NonFiniteLossError as exc:
        if rank == 0:
            _say(f"train/main.py: {exc}")
        return 3
    finally:
        if lock is not None:
            lock.release()
