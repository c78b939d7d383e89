"""Counts the tensor calls that make the host wait for the device (`.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `bool(t)`, `float(t)`, `int(t)`, `t.__index__()`), by who made them.

Each call is attributed to the first stack frame outside torch and bucketed: "training"
(speed_fast/training), "ops" (speed_fast/ops, the kernels), "speed_fast" (the rest of the
package), "deepspeed", "other". On a CPU run these calls do not wait for anything, but on a GPU
each one is a synchronisation, so counting them on CPU shows where a GPU run would stall.

    counter = SyncCounter().install()
    with counter.phase("step"):
        trainer.train_step(batches)
    counter.counts("step")   # {"training": 0, "ops": 0, "deepspeed": 1, ...}
"""

import contextlib
import os
import sys
from collections import Counter

import torch

_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)


def _bucket(path: str) -> str:
    path = path.replace(os.sep, "/")
    if "/speed_fast/training/" in path:
        return "training"
    if "/speed_fast/ops/" in path or "/kernels/" in path:
        return "ops"
    if "/speed_fast/" in path:
        return "speed_fast"
    if "/deepspeed/" in path:
        return "deepspeed"
    return "other"


class SyncCounter:
    def __init__(self):
        self.events = Counter()  # (phase, bucket, "file:line function") -> calls
        self._phase = None
        self._originals = {}

    def install(self) -> "SyncCounter":
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}

    def _wrap(self, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter._phase is not None:
                frame = sys._getframe(1)
                while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                             or frame.f_code.co_filename == _HERE):
                    frame = frame.f_back
                where = "?" if frame is None else frame.f_code.co_filename
                site = "?" if frame is None else (f"{os.path.basename(where)}:{frame.f_lineno} "
                                                  f"{frame.f_code.co_name}")
                counter.events[(counter._phase, _bucket(where), site)] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def counts(self, phase: str) -> dict:
        out = Counter()
        for (p, bucket, _), n in self.events.items():
            if p == phase:
                out[bucket] += n
        return dict(out)

    def sites(self, phase: str) -> dict:
        return {f"{bucket} {site}": n for (p, bucket, site), n in self.events.items() if p == phase}
