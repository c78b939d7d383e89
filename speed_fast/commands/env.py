"""`speed-fast env`: which backends are active on this machine, and why the others are not;
with `--compile sm_80,sm_90`, whether every Triton kernel compiles for those GPUs (no GPU needed)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

HELP = "report torch, devices and which fused-op backends are active (and why not); --compile checks GPU kernels"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--compile", metavar="ARCHS", default=None,
                   help="compile every Triton kernel variant ahead of time for these GPU architectures, e.g. "
                        "sm_80,sm_90 (no GPU needed): one line per kernel x dtype x arch with registers, spills, "
                        "shared memory and SASS instructions per element; exit status 1 if any fails")
    p.add_argument("--kernel-module", action="append", default=None, metavar="FILE.py",
                   help="with --compile: compile the cases (compile_cases()) of this kernel module file instead of "
                        "the built-in kernels (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="with --compile: compiler processes (default: all cores)")


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


def run_compile(args) -> int:
    from ..kernels import aot

    archs = aot.parse_archs(args.compile)
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Kernels imported under the interpreter cannot be compiled: do it in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "speed_fast.cli", "env", "--compile", args.compile]
        argv += [a for f in args.kernel_module or [] for a in ("--kernel-module", f)]
        argv += ["--json"] if args.json else []
        argv += ["--jobs", str(args.jobs)] if args.jobs else []
        return subprocess.run(argv, env=env).returncode
    import triton

    results = aot.compile_all(archs, args.kernel_module, jobs=args.jobs or os.cpu_count() or 1)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"triton": triton.__version__, "archs": archs, "results": [vars(r) for r in results]},
                         indent=2))
    else:
        print(f"Triton {triton.__version__}: {len(results)} kernel variants compiled for "
              f"{', '.join(f'sm_{a}' for a in archs)} ({len(failed)} failed)")
        for r in sorted(results, key=lambda r: (r.op, r.dtype, r.variant, r.arch)):
            print(r.line())
    return 1 if failed else 0


def run(args) -> int:
    if args.compile is not None:
        return run_compile(args)
    if args.kernel_module or args.jobs is not None:
        raise ValueError("--kernel-module and --jobs go with --compile")
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
