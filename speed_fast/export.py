"""A trained run's weights as a facebookresearch/DiT checkpoint file (`speed-fast export-dit`).

    info = export_dit(run_dir, "dit.pt")   # EMA weights in DiT's naming, written atomically

The output never lands on a file the command did not create: an existing path is refused unless
force=True, and a path inside any run directory (a folder holding config.json with checkpoints/ or
a .lock) is always refused, so a run's own files cannot be overwritten by its export.
"""

from __future__ import annotations

import os

from .atomic import check_replaceable, publish, temporary_name

DIT_SCHEDULE = ("linear", 1000, 1e-4, 0.02)  # what DiT's samplers assume


def run_dir_holding(path: str) -> str | None:
    """The run directory that `path` lies in (at any depth), or None."""
    d = os.path.dirname(os.path.realpath(path))
    while True:
        if os.path.isfile(os.path.join(d, "config.json")) and (
                os.path.isdir(os.path.join(d, "checkpoints")) or os.path.exists(os.path.join(d, ".lock"))):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def check_export_path(run: str, out: str, force: bool) -> str:
    """The absolute output path, or ValueError (before any loading) when it may not be written."""
    out_abs = os.path.abspath(out)
    if os.path.isdir(out_abs):
        raise ValueError(f"{out} is a directory; expected a file path such as {out}/dit.pt")
    holder = run_dir_holding(out_abs)
    if holder is not None or os.path.realpath(out_abs).startswith(os.path.realpath(run) + os.sep):
        raise ValueError(f"{out} lies inside the run directory {holder or run}; export to a path outside any run "
                         "(a run's own files are never overwritten)")
    if os.path.lexists(out_abs) and not force:
        raise ValueError(f"{out} exists; pass --force to replace it, or choose another path")
    check_replaceable(out_abs, "OUT")
    return out_abs


def export_dit(run: str, out: str, *, checkpoint: str | None = None, raw: bool = False, force: bool = False) -> dict:
    """Write `run`'s EMA (or raw, raw=True) weights to `out` in DiT's naming; returns what was written
    (path, DiT model name, tensor count, classes, the config, and whether DiT's schedule matches)."""
    import torch

    from .generate import load_checked
    from .models.interop import dit_model_name, to_dit_state_dict

    out_abs = check_export_path(run, out, force)
    if not os.path.isdir(run):
        raise ValueError(f"RUN {run!r}: no such run directory")
    model, config, _, meta = load_checked(run, ema=not raw, checkpoint=checkpoint)
    cfg = model.config
    name = dit_model_name(cfg)
    state = to_dit_state_dict(model.state_dict(), cfg)
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    tmp = temporary_name(out_abs)
    try:
        torch.save(state, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    publish([(tmp, out_abs)])
    schedule = config["train"]["schedule"]
    matches = (schedule.get("kind"), schedule.get("T"), schedule.get("beta_start"),
               schedule.get("beta_end")) == DIT_SCHEDULE
    return {"path": out_abs, "name": name, "tensors": len(state), "config": cfg, "schedule": schedule,
            "dit_schedule": matches, "num_classes": meta.get("num_classes", cfg.num_classes)}
