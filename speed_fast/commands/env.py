"""`speed-fast env`: which backends are active on this machine, and why the others are not."""

from __future__ import annotations

import json
import platform

HELP = "report torch, devices and which fused-op backends are active (and why not)"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def collect() -> dict:
    import torch

    from ..ops import available_backends, resolve_backend

    backends = {name: {"available": ok, "reason": why} for name, (ok, why) in available_backends().items()}
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": devices,
        "backends": backends,
        "auto": {d: resolve_backend("auto", d) for d in devices},
    }


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"python {report['python']}  torch {report['torch']}  cuda {report['cuda']}")
    for name, b in report["backends"].items():
        print(f"  {name:<7} {'active' if b['available'] else 'unavailable':<12} {b['reason']}")
    for dev, name in report["auto"].items():
        print(f"  auto on {dev}: {name}")
    return 0
