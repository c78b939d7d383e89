"""Named training statistics held in one device vector.

A step's statistics are sums over its micro-batches (and, after one all-reduce, over ranks):
the loss and its terms weighted by the batch size, the sample count, the sum of the loss
weights, a non-finite flag, and per-area sums and counts. They live in a single float64
tensor on the training device so that one all-reduce and one read-back cover all of them;
each name is a view into it:

    stats = Stats(STEP_FIELDS, device)
    stats.add("loss", loss * B)              # in place, on the device
    stats["area_loss"]                       # a [3] view
    host = stats.read()                      # {"loss": 12.5, "area_loss": [..3..], ...}: one copy to the host
"""

from __future__ import annotations

import torch

from .metrics import AREAS

# name -> number of entries: the statistics of one optimizer step.
STEP_FIELDS = {
    "loss": 1,          # sum over samples of the micro-batch loss (weighted MSE + VB) x batch size
    "mse": 1,           # sum of the per-sample unweighted eps MSE
    "vb": 1,            # sum of the per-sample VB term (bits/dim)
    "samples": 1,       # number of samples
    "weight": 1,        # sum of the loss weights w(t_b)
    "nonfinite": 1,     # number of micro-batches with a non-finite loss
    "stop": 1,          # number of ranks that received SIGTERM/SIGINT
    "area_loss": len(AREAS),     # sum of the per-sample MSE in each area
    "area_samples": len(AREAS),  # samples in each area
}


class Stats:
    """float64 sums with names, in one contiguous device vector (`vector`)."""

    def __init__(self, fields: dict[str, int], device):
        self.fields = dict(fields)
        self.vector = torch.zeros(sum(self.fields.values()), dtype=torch.float64, device=device)
        self._views, start = {}, 0
        for name, size in self.fields.items():
            self._views[name] = self.vector.narrow(0, start, size)  # (size,)
            start += size

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._views[name]

    def add(self, name: str, value) -> None:
        """Add `value` (a tensor on the device, or a number) to the named entries, in place."""
        view = self._views[name]
        view.add_(value.reshape(view.shape).to(view.dtype) if isinstance(value, torch.Tensor) else value)

    def zero_(self) -> None:
        self.vector.zero_()

    def read(self) -> dict:
        """The sums on the host (one device-to-host copy): floats, and lists for multi-entry fields."""
        values, out, start = self.vector.tolist(), {}, 0
        for name, size in self.fields.items():
            out[name] = values[start] if size == 1 else values[start:start + size]
            start += size
        return out


def step_record(sums: dict) -> dict:
    """Means of a step's (or a log window's) sums: the loss terms, the mean weight, and per area
    the mean unweighted MSE (None when no sample fell there) and the share of samples."""
    n = sums["samples"]
    out = {"loss": sums["loss"] / n, "mse": sums["mse"] / n, "vb": sums["vb"] / n, "mean_weight": sums["weight"] / n}
    for i, area in enumerate(AREAS):
        count = sums["area_samples"][i]
        out[f"loss_{area}"] = sums["area_loss"][i] / count if count else None
        out[f"frac_{area}"] = count / n
    return out
