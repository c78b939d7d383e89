"""Timing helpers shared by bench_fused_step.py and bench_sampling.py: machine metadata,
interleaved timing with percentiles, the results table and the JSON file.

Variants are timed round-robin (one call of each per round), so load from other processes
on a shared machine shifts all of them alike; the ratios are what to compare.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(threads: int, extra: dict | None = None) -> dict:
    from speed_fast.ops import available_backends

    out = {
        "machine": f"{os.cpu_count()}-core {cpu_model()}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {k: {"available": ok, "reason": why} for k, (ok, why) in available_backends().items()},
        "loadavg_start": os.getloadavg(),
        "nice": os.nice(0),  # a shared machine: `nice -n -10 python ...` keeps other jobs from skewing the timings
    }
    out.update(extra or {})
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(fns: dict, device, warmup: int = 5, iters: int = 50, max_seconds: float = 60.0) -> dict:
    """{name: sorted list of seconds per call}, calling each fn once per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return {name: sorted(ts) for name, ts in times.items()}


def gpu_seconds_per_call(fn, iters: int = 20, reps: int = 10) -> tuple[list[float], str]:
    """(sorted seconds per call, method): GPU time of `fn` (CUDA kernels only) without the host's
    launch overhead. `reps` calls are captured once in a CUDA graph and the graph is replayed
    `iters` times between CUDA events; where capture fails, the same calls are timed back to back
    between events (then a host slower than the kernels shows in the figure: method "events")."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run, method = graph.replay, "cuda_graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for _ in range(reps):
                fn()

        method = "events"
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / reps)
    return sorted(times), method


def percentiles_ms(ts: list[float]) -> dict:
    def q(p):
        return 1e3 * ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]

    return {"ms_p20": q(0.2), "ms_p50": q(0.5), "ms_p80": q(0.8), "n": len(ts)}


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, header); floats printed with 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def write_json(path: str | None, meta_: dict, results: list[dict]) -> None:
    meta_ = dict(meta_, loadavg_end=os.getloadavg())
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta_, "results": results}, f, indent=2)
        print(f"wrote {path}")
