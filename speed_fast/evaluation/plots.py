"""Quality against training step, read from a run's metrics.jsonl and drawn as a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

QUALITY_KEYS = ("fid", "fd_raw")


def read_quality(metrics_jsonl, key: str | None = None) -> tuple[str, list[int], list[float]]:
    """(key, steps, values) of the quality records in a metrics.jsonl (key: "fid", else "fd_raw")."""
    records = []
    with open(metrics_jsonl) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    if key is None:
        key = next((k for k in QUALITY_KEYS if any(k in r for r in records)), None)
        if key is None:
            raise ValueError(f"{metrics_jsonl} has no quality records (keys {QUALITY_KEYS})")
    rows = sorted((int(r["step"]), float(r[key])) for r in records if key in r and "step" in r)
    if not rows:
        raise ValueError(f"{metrics_jsonl} has no records with {key!r}")
    return key, [s for s, _ in rows], [v for _, v in rows]


def plot_quality(metrics_jsonl, out_png, key: str | None = None, label: str | None = None) -> str:
    """Plot quality (Fréchet distance, lower is better) vs training step from a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, steps, values = read_quality(metrics_jsonl, key)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, marker="o", label=label or Path(metrics_jsonl).parent.name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{key} (lower is better)")
    if min(values) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return str(out_png)
