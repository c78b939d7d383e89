"""Counts the tensor calls that make the host wait for the device (`.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `bool(t)`, `float(t)`, `int(t)`, `t.__index__()`), by who made them, and apart from
them ("h2d" in `counts(phase, kind="h2d")`) the blocking copies of host tensors to a device
(`t.to(device)` of a CPU tensor without non_blocking=True: on a GPU it waits for the stream).

Each call is attributed to the first stack frame outside torch and bucketed: "training"
(speed_fast/training), "ops" (speed_fast/ops, the kernels), "speed_fast" (the rest of the
package, unless called on behalf of the ops or the training package: then theirs),
"deepspeed", "other". On a CPU run these calls do not wait for anything, but on a GPU
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


def _owner(frame) -> str:
    """The bucket of the caller, except that a speed_fast helper (e.g. alias.py) called on behalf of
    the ops or the training package is counted as theirs: the nearest such frame up the stack."""
    first = _bucket(frame.f_code.co_filename) if frame is not None else "other"
    if first != "speed_fast":
        return first
    while frame is not None:
        bucket = _bucket(frame.f_code.co_filename)
        if bucket in ("ops", "training"):
            return bucket
        frame = frame.f_back
    return first


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
        self._originals["to"] = torch.Tensor.to
        torch.Tensor.to = self._wrap(torch.Tensor.to, kind="h2d")
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}

    def _wrap(self, original, kind: str = "sync"):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter._phase is not None and (kind == "sync" or _blocking_upload(tensor, args, kwargs)):
                frame = sys._getframe(1)
                while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                             or frame.f_code.co_filename == _HERE):
                    frame = frame.f_back
                where = "?" if frame is None else frame.f_code.co_filename
                site = "?" if frame is None else (f"{os.path.basename(where)}:{frame.f_lineno} "
                                                  f"{frame.f_code.co_name}")
                counter.events[(counter._phase, _owner(frame), site, kind)] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def counts(self, phase: str, kind: str = "sync") -> dict:
        out = Counter()
        for (p, bucket, _, k), n in self.events.items():
            if p == phase and k == kind:
                out[bucket] += n
        return dict(out)

    def sites(self, phase: str) -> dict:
        return {f"{kind} {bucket} {site}": n for (p, bucket, site, kind), n in self.events.items() if p == phase}


def _blocking_upload(tensor, args, kwargs) -> bool:
    """t.to(...) of a CPU tensor that names a device and does not ask for non_blocking."""
    if tensor.device.type != "cpu" or kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, (torch.device, str)) or isinstance(target, torch.Tensor)
