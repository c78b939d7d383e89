"""Named training statistics held on the training device, read back once per log line.

Two float64 vectors, each a set of named views (`Stats`):

* the step's statistics (`STEP_FIELDS`): sums over its micro-batches (and, after one
  all-reduce on the device, over ranks): the loss and its terms weighted by the batch size,
  the sample count, the sum of the loss weights, per-area sums and counts, and the number of
  micro-batches whose loss was not finite;
* the log window (`LOG_FIELDS`): the same sums added up over the steps since the last log
  line, counting only steps whose update was applied, the grad norms of those steps, the
  skipped steps of the window, and the run's counters (skipped steps, the current streak of
  non-finite steps, the step at which that streak reached --max-nonfinite).

Everything is updated in place by device ops, so a training step never waits for the device;
`read()` copies a whole vector to the host in one transfer, which the trainer does only when it
writes a log line or a checkpoint.

    stats = Stats(STEP_FIELDS, device)
    stats.add("loss", loss * B)              # in place, on the device
    stats["area_loss"]                       # a [3] view
    host = stats.read()                      # {"loss": 12.5, "area_loss": [..3..], ...}: one copy to the host
"""

from __future__ import annotations

import torch

from .metrics import AREAS

# Sums of one step that the log window adds up over its applied steps (the same leading layout in
# both vectors, so the window adds a step with one masked add).
SUMMED = {
    "loss": 1,          # sum over samples of the micro-batch loss (weighted MSE + VB) x batch size
    "mse": 1,           # sum of the per-sample unweighted eps MSE
    "vb": 1,            # sum of the per-sample VB term (bits/dim)
    "samples": 1,       # number of samples
    "weight": 1,        # sum of the loss weights w(t_b)
    "area_loss": len(AREAS),     # sum of the per-sample MSE in each area
    "area_samples": len(AREAS),  # samples in each area
}
STEP_FIELDS = {**SUMMED, "nonfinite": 1}  # nonfinite: micro-batches (over ranks) with a non-finite loss
WINDOW_FIELDS = {**SUMMED, "grad_norm": 1, "skipped": 1}  # grad_norm: sum over applied steps
COUNTER_FIELDS = {"skipped_steps": 1, "nonfinite_streak": 1, "limit_step": 1}  # kept across windows
LOG_FIELDS = {**WINDOW_FIELDS, **COUNTER_FIELDS}
SUMMED_SIZE = sum(SUMMED.values())


class Stats:
    """float64 values with names, in one contiguous device vector (`vector`)."""

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

    def zero_(self, names=None) -> None:
        """Zero every entry, or only those of `names`."""
        if names is None:
            self.vector.zero_()
        else:
            for name in names:
                self._views[name].zero_()

    def read(self) -> dict:
        """The values on the host (one device-to-host copy): floats, and lists for multi-entry fields."""
        return self.unpack(self.vector.tolist())

    def unpack(self, values: list) -> dict:
        out, start = {}, 0
        for name, size in self.fields.items():
            out[name] = values[start] if size == 1 else values[start:start + size]
            start += size
        return out

    def load(self, values: dict) -> None:
        """Set the named entries from a dict as `read()` returns it (e.g. restored from a checkpoint)."""
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; known: {sorted(self.fields)}")
        for name, value in values.items():
            self._views[name].copy_(torch.as_tensor(value, dtype=torch.float64).reshape(self._views[name].shape))


def window_record(sums: dict, applied_steps: int) -> dict:
    """Means over a log window's `applied_steps` steps (those whose update was applied): the loss
    terms, the mean weight, the mean grad norm, and per area the mean unweighted MSE and the share
    of samples. A mean over nothing (no applied step; no sample in an area) is None."""
    n = sums["samples"]

    def mean(x, count):
        return x / count if count else None

    out = {"loss": mean(sums["loss"], n), "mse": mean(sums["mse"], n), "vb": mean(sums["vb"], n),
           "mean_weight": mean(sums["weight"], n), "grad_norm": mean(sums["grad_norm"], applied_steps)}
    for i, area in enumerate(AREAS):
        count = sums["area_samples"][i]
        out[f"loss_{area}"] = mean(sums["area_loss"][i], count)
        out[f"frac_{area}"] = mean(count, n)
    return out
