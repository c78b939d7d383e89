"""Fused SpeeD step benchmark: sample + noise + weighted MSE, forward and backward, vs eager torch.

    python benchmarks/bench_fused_step.py --out fused_step.json [--threads 2] [--iters 50] [--quick]

Variants, on identical inputs in one process, timed round-robin:
  eager      the reference implementation's way (model-free): t = torch.multinomial(P, B),
             eps = randn_like(x0), x_t = sqrt_ab[t] x0 + sqrt_1mab[t] eps,
             loss = mean_flat(w[t] (pred - eps)^2).mean(), loss.backward(); pred is a fixed
             tensor that requires grad, standing in for the model output.
  compiled   torch.compile of that eager forward (backward through AOTAutograd).
  cpp        FusedSpeeD(backend="cpp"): .sample_and_noise, .loss, backward (CPU).
  cpp-regen  the same with the cpp backend's kept noise switched off (eps drawn twice).
  triton     FusedSpeeD(backend="triton") on CUDA.
CPU: float32 at 256x4x32x32 (the DiT-XL/2 training batch) and 256x4x64x64; CUDA: bfloat16 at
256x4x32x32 and 256x4x128x128, plus the bandwidth of the two fused kernels alone (GPU time of a
CUDA graph of back-to-back launches) at 256x4x{64,128,256}^2, printed as GB/s and as a fraction of
the card's peak (by name, or --peak-gbps).

Before timing, the fused backends are checked against the torch reference backend (same
RNG: t identical, x_t and the loss to float32 rounding), and the eager / compiled baselines
(torch's RNG) against the loss they must average, 2 E_P[w] for pred ~ N(0, 1).

Extra peak memory: bytes alive at the peak of one step beyond its inputs, minus the two
outputs any implementation has (x_t, pred.grad), in latent-sized buffers (x0's size). CPU: the
resident-set high-water mark of one step in a fresh process per variant (see
extra_peak_buffers), at the first shape; CUDA: max_memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import (gpu_seconds_per_call, meta, percentiles_ms, print_table, sync, time_round_robin,  # noqa: E402
                     write_json)

from speed_fast.ops import FusedSpeeD, backend_status  # noqa: E402
from speed_fast.schedule import NoiseSchedule  # noqa: E402
from speed_fast.timesteps import make_strategy  # noqa: E402

# The bandwidth of the kernels alone is measured at these bfloat16 shapes (CUDA).
BANDWIDTH_SHAPES = [(256, 4, 64, 64), (256, 4, 128, 128), (256, 4, 256, 256)]
# Peak HBM bandwidth (GB/s) by device name, for the bandwidth fraction on CUDA.
PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (CPU)")
    p.add_argument("--iters", type=int, default=50, help="timed rounds per shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few rounds: a smoke test of the script")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--peak-gbps", type=float, help="the device's peak memory bandwidth (default: by name)")
    p.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Setup:
    """The SpeeD tables and the inputs of one shape."""

    def __init__(self, shape, dtype, device, seed=0):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
        self.strategy = make_strategy("speed", s, k=5.0, tau=700, lam=0.6)
        self.schedule = s
        f32 = dict(dtype=torch.float32, device=self.device)
        self.P = self.strategy.probs(0).to(**f32)
        self.sqrt_ab = s.sqrt_alphas_cumprod.to(**f32)
        self.sqrt_1mab = s.sqrt_one_minus_alphas_cumprod.to(**f32)
        self.w = self.strategy.weights.to(**f32)
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(shape, generator=g).to(dtype=dtype, device=self.device)
        self.pred = torch.randn(shape, generator=g).to(dtype=dtype, device=self.device).requires_grad_()
        # E[loss] = 2 E_P[w] for pred, eps ~ N(0, 1); 5 standard deviations of its mean over B draws
        p, w = self.strategy.probs(0), self.strategy.weights
        mean_w = float((p * w).sum())
        self.expected_loss = 2.0 * mean_w
        self.loss_rtol = 5 * float((p * (w - mean_w) ** 2).sum()) ** 0.5 / mean_w / shape[0] ** 0.5 + 0.01

    def eager_forward(self, x0, pred):
        B = x0.shape[0]
        t = torch.multinomial(self.P, B, replacement=True)
        eps = torch.randn_like(x0)
        bshape = (B,) + (1,) * (x0.ndim - 1)
        xt = self.sqrt_ab[t].view(bshape) * x0 + self.sqrt_1mab[t].view(bshape) * eps
        loss = (self.w[t].view(bshape) * (pred - eps) ** 2).mean(dim=tuple(range(1, x0.ndim))).mean()
        return xt, loss

    def fused(self, backend):
        return FusedSpeeD(self.schedule, self.strategy, device=self.device, backend=backend, seed=0)


def _keep_noise(keep):
    """The cpp backend's kept-noise switch for one variant (keep None: not a cpp variant)."""
    if keep is None:
        return contextlib.nullcontext()
    from speed_fast.ops import _cpp

    return _cpp.keep_noise(bool(keep))


def make_variants(st: Setup, backends, compile_baseline: bool):
    fns = {}

    def eager():
        xt, loss = st.eager_forward(st.x0, st.pred)
        loss.backward()
        st.pred.grad = None
        return xt, loss

    fns["eager"] = eager
    if compile_baseline:
        compiled_forward = torch.compile(st.eager_forward)

        def compiled():
            xt, loss = compiled_forward(st.x0, st.pred)
            loss.backward()
            st.pred.grad = None
            return xt, loss

        fns["compiled"] = compiled
    for name, backend, keep in backends:
        fused = st.fused(backend)
        step = [0]

        def run(fused=fused, step=step, keep=keep):
            step[0] += 1
            with _keep_noise(keep):
                t, xt = fused.sample_and_noise(st.x0, step=step[0])
                loss, _ = fused.loss(st.pred, t, step=step[0])
            loss.backward()
            st.pred.grad = None
            return xt, loss

        fns[name] = run
    return fns


def check_agreement(st: Setup, fns: dict, backends) -> None:
    """Fused backends vs the torch reference backend (same RNG); baselines vs the expected loss."""
    ref = FusedSpeeD(st.schedule, st.strategy, device="cpu", backend="torch", seed=0)  # the CPU reference
    x0_cpu = st.x0.detach().cpu()
    t_ref, xt_ref = ref.sample_and_noise(x0_cpu, step=1)
    loss_ref, _ = ref.loss(st.pred.detach().cpu(), t_ref, step=1)
    tol = 1e-5 if st.dtype == torch.float32 else float(torch.finfo(st.dtype).eps) * float(xt_ref.float().abs().max())
    for name, backend, keep in backends:
        fused = st.fused(backend)
        with _keep_noise(keep):
            t, xt = fused.sample_and_noise(st.x0, step=1)
            loss, _ = fused.loss(st.pred.detach(), t, step=1)
        assert torch.equal(t.cpu(), t_ref), f"{name}: time steps differ from the reference"
        err = float((xt.detach().float().cpu() - xt_ref.float()).abs().max())
        assert err <= tol, f"{name}: x_t differs from the reference by {err}"
        assert abs(float(loss) - float(loss_ref)) <= 1e-4 * abs(float(loss_ref)), f"{name}: loss {loss} vs {loss_ref}"
    for name in ("eager", "compiled"):
        if name in fns:
            _, loss = fns[name]()
            assert abs(float(loss) / st.expected_loss - 1) < st.loss_rtol, \
                f"{name}: loss {float(loss)}, expected {st.expected_loss}"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def extra_peak_buffers(st: Setup, fn) -> float:
    """Peak bytes alive during one step beyond its inputs and the two outputs every
    implementation has (x_t, pred.grad), in latent-sized buffers (x0's size). CUDA:
    max_memory_allocated. CPU: the resident-set high-water mark over one step (reset through
    /proc/self/clear_refs), in a process whose glibc malloc maps every block of 64 KiB or more
    on its own (MALLOC_MMAP_THRESHOLD_, see main), so freed buffers leave the resident set and
    new ones enter it: this counts the compiled and C++ code's buffers alike."""
    latent = st.x0.numel() * st.x0.element_size()
    for _ in range(3):  # compiled code and caches settle first
        fn()
    sync(st.device)
    if st.device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync(st.device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _status_bytes("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        out = fn()
        peak = _status_bytes("VmHWM:") - base
    del out
    return peak / latent - 2


def _memory_child(args) -> int:
    """Print the extra peak of one variant at one shape (run by main in a fresh process)."""
    shape = tuple(int(v) for v in args.memory_child[1].split("x"))
    st = Setup(shape, torch.float32, "cpu")
    backends = [b for b in (("cpp", "cpp", 1), ("cpp-regen", "cpp", 0)) if b[0] == args.memory_child[0]]
    fns = make_variants(st, backends, compile_baseline=args.memory_child[0] == "compiled")
    print(json.dumps({"extra_peak_buffers": extra_peak_buffers(st, fns[args.memory_child[0]])}))
    return 0


def cpu_extra_peak_buffers(name: str, shape, threads: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--memory-child", name,
           "x".join(map(str, shape))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_buffers"]


def bandwidth_rows(shapes, dtype, iters: int, peak_gbps: float | None) -> list[dict]:
    """GB/s of the two fused Triton kernels alone (each reads one latent-sized tensor and writes
    one; the tables are negligible), GPU time from a CUDA graph of back-to-back launches of the
    kernels' launchers, so that host overhead does not count."""
    from speed_fast.kernels.sample_and_noise import sample_and_noise_fwd
    from speed_fast.kernels.weighted_mse import weighted_mse_fwd

    rows = []
    for shape in shapes:
        st = Setup(shape, dtype, "cuda")
        fused = st.fused("triton")
        t, _ = fused.sample_and_noise(st.x0, step=1)
        pred = st.pred.detach()
        fns = {"triton sample_and_noise kernel": lambda: sample_and_noise_fwd(
                   st.x0, fused.prob, fused.alias, fused.sqrt_ab, fused.sqrt_1mab, 0, 1, 0),
               "triton weighted_mse kernels": lambda: weighted_mse_fwd(pred, t, fused.weights, 0, 1, 0)}
        nbytes = 2 * st.x0.numel() * st.x0.element_size()
        for name, fn in fns.items():
            ts, method = gpu_seconds_per_call(fn, iters=iters)
            row = dict(name=name, backend="triton", shape="x".join(map(str, shape)),
                       dtype=str(dtype).replace("torch.", ""), **percentiles_ms(ts), speedup_vs_eager=None,
                       timing=method)
            row["gb_per_s"] = nbytes / (row["ms_p50"] * 1e-3) / 1e9
            row["fraction_of_peak"] = row["gb_per_s"] / peak_gbps if peak_gbps else None
            rows.append(row)
        del st, fused, t, pred
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return _memory_child(args)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.quick:
        shapes, iters = [(8, 4, 8, 8)], 3
    else:
        shapes = [(256, 4, 32, 32), (256, 4, 128, 128) if on_gpu else (256, 4, 64, 64)]
        iters = args.iters
    backends = []
    if on_gpu:
        backends.append(("triton", "triton", None))
    else:
        if backend_status("cpp")[0]:
            backends += [("cpp", "cpp", 1), ("cpp-regen", "cpp", 0)]
        if backend_status("triton")[0]:  # the interpreter (TRITON_INTERPRET=1): a smoke test only
            backends.append(("triton", "triton", None))
    for name, backend, _ in backends:
        ok, why = backend_status(backend)
        assert ok, f"{backend}: {why}"
    peak_gbps = args.peak_gbps
    if on_gpu and peak_gbps is None:
        peak_gbps = next((v for k, v in PEAK_GBPS.items() if k in torch.cuda.get_device_name()), None)
    from speed_fast.ops import _cpp

    info = meta(args.threads, {"device": str(device), "dtype": str(dtype), "peak_gbps": peak_gbps,
                               "cpp_isa": _cpp.cpu_isa() if backend_status("cpp")[0] else None})
    print(f"{info['machine']}, torch {info['torch']}, {args.threads} threads, device {device}"
          + (f" ({info['cuda']})" if on_gpu else f", cpp kernels: {info['cpp_isa']}"))
    results = []
    for shape in shapes:
        st = Setup(shape, dtype, device)
        fns = make_variants(st, backends, compile_baseline=not args.no_compile)
        check_agreement(st, fns, backends)
        times = time_round_robin(fns, device, warmup=3 if args.quick else 5, iters=iters)
        eager_p50 = percentiles_ms(times["eager"])["ms_p50"]
        compiled_p50 = percentiles_ms(times["compiled"])["ms_p50"] if "compiled" in times else None
        for name, ts in times.items():
            row = dict(name=f"step {name}", backend=name, shape="x".join(map(str, shape)),
                       dtype=str(dtype).replace("torch.", ""), **percentiles_ms(ts))
            row["speedup_vs_eager"] = eager_p50 / row["ms_p50"]
            row["speedup_vs_compiled"] = compiled_p50 / row["ms_p50"] if compiled_p50 else None
            if on_gpu:
                row["extra_peak_buffers"] = extra_peak_buffers(st, fns[name])
            elif shape == shapes[0] and name != "triton" and not args.quick:  # not the interpreter
                row["extra_peak_buffers"] = cpu_extra_peak_buffers(name, shape, args.threads)
            results.append(row)
    if on_gpu:
        results += bandwidth_rows(BANDWIDTH_SHAPES[:1] if args.quick else BANDWIDTH_SHAPES, dtype, iters, peak_gbps)
        for row in results:
            if row.get("gb_per_s"):
                peak = f"{100 * row['fraction_of_peak']:.0f}% of {peak_gbps:.0f} GB/s peak" if peak_gbps else \
                    "peak unknown (--peak-gbps)"
                print(f"{row['name']} {row['shape']} {row['dtype']}: {row['gb_per_s']:.0f} GB/s, {peak}")
    print_table(results, [("name", "variant"), ("shape", "shape"), ("dtype", "dtype"), ("ms_p20", "p20 ms"),
                          ("ms_p50", "p50 ms"), ("ms_p80", "p80 ms"), ("speedup_vs_eager", "x eager"),
                          ("speedup_vs_compiled", "x compiled"), ("extra_peak_buffers", "extra peak (latents)"),
                          ("gb_per_s", "GB/s"), ("fraction_of_peak", "of peak")])
    write_json(args.out, info, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
