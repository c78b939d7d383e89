"""Run-directory logging on rank 0: metrics.jsonl, TensorBoard events, and the loss plot.

metrics.jsonl holds one JSON object per logged step (see README "Training" for the keys);
on resume the lines after the checkpoint's step are dropped, since the resumed run logs those
steps again (with the same values, exact resume being the point).
"""

from __future__ import annotations

import json
import math
import os

from .checkpoint import write_atomic

AREAS = ("acceleration", "deceleration", "convergence")


def _clean(value):
    """JSON-safe scalars: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_after(path: str, step: int) -> None:
    """Keep only the records with step <= `step` (atomic rewrite)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(kept))


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Appends records to <run_dir>/metrics.jsonl and mirrors numeric fields to TensorBoard."""

    def __init__(self, run_dir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        truncate_after(self.path, resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a previous (interrupted) run wrote after the checkpoint.
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key.replace("loss_", "loss_area/") if key.startswith("loss_") else key,
                                        value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_loss(metrics_path: str, out_png: str, title: str = "") -> str:
    """Loss and per-area unweighted MSE vs step (moving average over ~2% of the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [r for r in read_metrics(metrics_path) if r.get("loss") is not None]
    if not records:
        raise ValueError(f"{metrics_path} has no loss records to plot")
    steps = np.array([r["step"] for r in records])
    window = max(1, len(records) // 50)

    def smooth(values):
        v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
        if window == 1:
            return v
        kernel = np.ones(window)
        ok = np.isfinite(v)
        num = np.convolve(np.where(ok, v, 0.0), kernel, mode="same")
        den = np.convolve(ok.astype(np.float64), kernel, mode="same")
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(steps, smooth([r["loss"] for r in records]), label="loss (weighted MSE + VB)")
    ax0.plot(steps, smooth([r.get("mse") for r in records]), label="MSE (unweighted)", alpha=0.8)
    ax0.set_xlabel("step")
    ax0.set_yscale("log")
    ax0.set_title(title or "training loss")
    ax0.legend()
    for area in AREAS:
        ax1.plot(steps, smooth([r.get(f"loss_{area}") for r in records]), label=area)
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    ax1.set_title("unweighted MSE per area")
    ax1.legend()
    for ax in (ax0, ax1):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
