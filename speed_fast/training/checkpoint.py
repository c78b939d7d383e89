"""Checkpoints: atomic publication, discovery on resume, and loading a run for inference.

Layout of <run_dir>/checkpoints:

    latest                 the tag of the newest complete checkpoint (replaced atomically)
    step-00001000/         one complete checkpoint:
        (DeepSpeed files)  model/optimizer states of every rank (engine.save_checkpoint)
        model.pt           full fp32 master weights {name: tensor} (rank 0)
        ema.pt             full fp32 EMA weights {name: tensor} (rank 0)
        rng-rank<r>.pt     torch / CUDA / numpy / python RNG states of rank r
        state.json         step, micro-step, data position, counters, config (written last)
    .tmp-step-00001000/    a checkpoint being written (never read; removed on the next start)

Publication: every rank writes into the `.tmp-` directory, all ranks meet at a barrier, then
rank 0 renames the directory to its final tag and replaces `latest` (write + fsync + rename).
A crash at any point leaves either the previous checkpoint or the new one, never half of one:
`find_latest` only accepts a directory that has state.json, and falls back to the newest such
directory when `latest` is stale. The directory must be on a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

STATE_FILE = "state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^step-(\d+)$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(path, "model.pt"))


def complete_tags(ckpt_root: str) -> list[str]:
    """Complete checkpoint tags in `ckpt_root`, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root) if _TAG.match(d) and is_complete(os.path.join(ckpt_root, d))]
    return sorted(tags, key=lambda d: int(_TAG.match(d).group(1)))


def find_latest(ckpt_root: str) -> str | None:
    """Path of the newest complete checkpoint, or None. Half-written ones are ignored."""
    pointer = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            tag = f.read().strip()
        path = os.path.join(ckpt_root, tag)
        if _TAG.match(tag) and is_complete(path):
            newer = [t for t in complete_tags(ckpt_root) if int(_TAG.match(t).group(1)) > int(_TAG.match(tag).group(1))]
            if not newer:
                return path
    tags = complete_tags(ckpt_root)
    return os.path.join(ckpt_root, tags[-1]) if tags else None


def remove_stale(ckpt_root: str) -> None:
    """Delete leftovers of interrupted saves (rank 0, before training starts)."""
    if os.path.isdir(ckpt_root):
        for d in os.listdir(ckpt_root):
            if d.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` all at once: a reader sees the old file or the new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_root: str, step: int, state: dict, model_sd: dict, ema_sd: dict, rank: int,
         barrier, keep: int) -> str:
    """Write one checkpoint collectively (every rank calls this) and publish it; returns its path.

    `state` must be JSON-serialisable; model_sd / ema_sd are the full fp32 state dicts (used on rank 0)."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = os.path.join(ckpt_root, tmp_tag)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    barrier()
    engine.save_checkpoint(ckpt_root, tag=tmp_tag, save_latest=False)
    torch.save(rng_state(), os.path.join(tmp_dir, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save(model_sd, os.path.join(tmp_dir, "model.pt"))
        torch.save(ema_sd, os.path.join(tmp_dir, "ema.pt"))
    barrier()  # every rank's files are in tmp_dir
    final = os.path.join(ckpt_root, tag)
    if rank == 0:
        write_atomic(os.path.join(tmp_dir, STATE_FILE), json.dumps(state, indent=1))
        if os.path.exists(final):  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        _fsync_dir(ckpt_root)
        write_atomic(os.path.join(ckpt_root, LATEST), tag + "\n")
        for old in complete_tags(ckpt_root)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    barrier()  # published before anyone moves on (or exits)
    return final


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load(engine, path: str, rank: int) -> dict:
    """Restore model and optimizer (DeepSpeed), this rank's RNG states; returns state.json's dict."""
    root, tag = os.path.split(os.path.normpath(path))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(path)


def load_ema(path: str) -> dict:
    return torch.load(os.path.join(path, "ema.pt"), map_location="cpu", weights_only=True)


def load_for_inference(run_dir: str, ema: bool = True, device="cpu", checkpoint: str | None = None):
    """(model, config dict, schedule, data meta) of a trained run, ready for sampling.

    run_dir: a run directory written by train/main.py (its newest complete checkpoint is used,
    or `checkpoint`, a tag such as "step-00001000" or a checkpoint path). ema=True loads the EMA
    weights (what DiT samples with), False the raw model weights. The model is a plain
    `speed_fast.models.DiT` in eval mode, fp32, on `device`; the schedule is the run's
    NoiseSchedule; the data meta is the training file's sidecar (shape, classes, class names)."""
    from ..models.dit import DiT, DiTConfig
    from ..schedule import NoiseSchedule

    if checkpoint is not None and os.path.isdir(checkpoint):
        path = checkpoint
        run_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))
    else:
        root = os.path.join(run_dir, "checkpoints")
        path = os.path.join(root, checkpoint) if checkpoint else find_latest(root)
        if path is None or not is_complete(path):
            raise ValueError(f"{run_dir}: no complete checkpoint under {root}"
                             + (f" named {checkpoint!r}" if checkpoint else ""))
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    dit_cfg = DiTConfig(**{**config["dit_config"], "grad_checkpointing": False})
    model = DiT(dit_cfg)
    weights = torch.load(os.path.join(path, "ema.pt" if ema else "model.pt"), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    schedule = NoiseSchedule.make(**config["train"]["schedule"])
    return model, config, schedule, config["data_meta"]
