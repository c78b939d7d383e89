"""Training-step benchmark: what SpeeD costs per step on CPU, and img/s, ms per step and MFU on a GPU.

    python benchmarks/bench_train_step.py --out train_step.json [--threads 2] [--rounds 40] [--quick]
    python benchmarks/bench_train_step.py --out train_step_gpu.json --gpu-batches 32   # on a CUDA machine

Same model, same batch, same AdamW, one process, variants timed round-robin (one step of each per
round, so load from other processes shifts them alike):

  eager-uniform   DiT's reference step: t = randint, eps = randn_like(x0), x_t by gathering the
                  schedule tables, loss = mean_flat((pred - eps)^2) + VB, label dropout by
                  torch.rand inside the model.
  eager-speed     the SpeeD reference implementation's step: t = multinomial(P, B), the same
                  eager noising, loss = w[t] * mse + VB.
  fused-speed     this project's step: FusedSpeeD (alias draw + counter-RNG noise in one pass, fused
                  weighted MSE), GaussianDiffusion.training_losses, label dropout from (seed, step)
                  as the trainer draws it (LabelDropout).
  fused-speed-compiled (CPU, with --cpu-compile) the same with the model under torch.compile.
  fused-loss-moment (CPU) the fused step with the adaptive `loss_moment` strategy (importance
                  weights) fed each step's losses, its table and weights rebuilt on the device at
                  EVERY step (update_every 1: the worst case; a run rebuilds every update_every
                  steps, default 100). Its cost is reported against fused-speed (static SpeeD), with
                  the time of one rebuild alone.
  fused-adaptive-speed (CPU) the same for `adaptive_speed` (SpeeD+dual whose k and tau follow the
                  per-bin losses; history 2, so the rule itself runs from the second step on),
                  rebuilt at every step. For both adaptive strategies the cost at the default
                  update_every = 100 is also given, in % of the static SpeeD step: the objective
                  tier's every-step difference (the adaptive work does not touch the model, and
                  that tier times it with much less noise) less one rebuild, plus one rebuild / 100.

Two tiers on CPU: "step" (forward, backward and optimizer step of the model) and "objective"
(the same without the model: a fixed leaf tensor stands in for its output, so only the diffusion
machinery is timed, VB term included). SpeeD's overhead is (fused-speed - eager-uniform) /
eager-uniform of the step; the objective tier measures the same difference with much less noise.

CPU: the digits preset (train/configs/digits.json: its DiT on 1x8x8, batch 128, float32).
CUDA (when present): DiT-XL/2 at 256px latents (4x32x32) with the trainer's GPU set-up: fp32
weights, the model's forward under bf16 autocast (fp32 residual stream), torch.compile of the
model (--no-compile: eager), SDPA attention, fused AdamW, the triton SpeeD ops; micro-batch 32
by default (--gpu-batches). Reported per variant: ms per step, img/s, and MFU = img/s x 712
GFLOP (DiT-XL/2's 118.6 GMAC forward x 2 FLOP x 3 for forward and backward) / the card's dense
bf16 peak (by name, or --peak-tflops), plus the peak memory allocated.

Before timing, the fused objective is checked against the eager formula on the same t and noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import meta, percentiles_ms, print_table, time_round_robin, write_json  # noqa: E402

from speed_fast.data.digits import digits_arrays  # noqa: E402
from speed_fast.diffusion import GaussianDiffusion, mean_flat  # noqa: E402
from speed_fast.models import DiT, DiTConfig, flops_per_image  # noqa: E402
from speed_fast.ops import FusedSpeeD  # noqa: E402
from speed_fast.ops import noise_ref  # noqa: E402
from speed_fast.schedule import NoiseSchedule  # noqa: E402
from speed_fast.timesteps import make_strategy  # noqa: E402
from speed_fast.training.config import load_preset  # noqa: E402
from speed_fast.training.label_dropout import LabelDropout  # noqa: E402

CONFIGS = os.path.join(ROOT, "train", "configs")
# Dense bf16 peak (FLOP/s) by device name, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (CPU)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds per tier")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time limit per tier")
    p.add_argument("--quick", action="store_true", help="a few rounds: a smoke test of the script")
    p.add_argument("--cpu-compile", action="store_true", help="CPU: also time the fused step with a compiled model")
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA section even when CUDA is present")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU (digits) section: the CUDA figures only")
    p.add_argument("--no-compile", action="store_true", help="CUDA section: eager model (default: torch.compile)")
    p.add_argument("--gpu-batches", default="32", help="CUDA section: comma-separated micro-batch sizes")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by name)")
    return p.parse_args(argv)


class Step:
    """The step variants on one model, optimizer, schedule and batch. `autocast`: the model's forward
    (only) runs under bf16 autocast, as DeepSpeed's torch_autocast does in the trainer."""

    def __init__(self, model, x0, y, schedule, device, with_model=True, seed=0, autocast=False):
        self.model, self.x0, self.y = model, x0, y
        self.device = torch.device(device)
        self.with_model = with_model
        self.autocast = autocast
        self.T = schedule.T
        self.diffusion = GaussianDiffusion(schedule, device=device)
        self.speed = make_strategy("speed", schedule, k=5.0, tau=700, lam=0.6)
        self.fused = FusedSpeeD(schedule, self.speed, device=device, seed=seed)
        self.probs = self.speed.probs(0).float().to(device)  # (T,)
        self.weights = self.speed.weights.float().to(device)  # (T,)
        self.sqrt_ab = schedule.sqrt_alphas_cumprod.float().to(device)
        self.sqrt_1mab = schedule.sqrt_one_minus_alphas_cumprod.float().to(device)
        self.seed = seed
        self.step_id = 0
        B, C = x0.shape[:2]
        self.label_drop = LabelDropout(seed, 0.1, B, device=device)
        if with_model:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
        else:  # the model's output, fixed: only the diffusion objective is timed
            self.out = (0.5 * torch.randn(B, 2 * C, *x0.shape[2:], device=device)).requires_grad_()

    def _model(self, x_t, t, y, drop=None):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(x_t, t, y, drop) if drop is not None else self.model(x_t, t, y)

    def _forward(self, x_t, t, drop=None):
        if not self.with_model:
            return self.out
        return self._model(x_t, t, self.y, drop)

    def _finish(self, loss):
        if self.with_model:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        else:
            self.out.grad = None
            loss.backward()
        return loss

    def _eager(self, t, weighted):
        x0 = self.x0
        C = x0.shape[1]
        noise = torch.randn_like(x0)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x_t = self.sqrt_ab[t].view(shape) * x0 + self.sqrt_1mab[t].view(shape) * noise
        out = self._forward(x_t, t)
        eps = out[:, :C]
        mse = mean_flat((noise - eps.float()) ** 2)
        vb = self.diffusion.vb_terms_bpd(torch.cat([eps.detach(), out[:, C:]], dim=1), x0, x_t, t)
        mse = self.weights[t] * mse if weighted else mse
        return self._finish((mse + vb).mean())

    def eager_uniform(self):
        return self._eager(torch.randint(0, self.T, (self.x0.shape[0],), device=self.device), weighted=False)

    def eager_speed(self):
        return self._eager(torch.multinomial(self.probs, self.x0.shape[0], replacement=True), weighted=True)

    def fused_speed(self, fused=None):
        self.step_id += 1
        drop = self.label_drop(self.step_id)
        model = self._model if self.with_model else (lambda x_t, t, y, d=None: self.out)
        terms = self.diffusion.training_losses(model, self.x0, self.y, fused or self.fused, step=self.step_id,
                                               drop=drop)
        if fused is not None:  # the trainer's adaptive part: observe the losses, end the step
            with torch.no_grad():
                fused.observe(terms["t"], terms["mse"])
                fused.end_step(self.step_id)
        return self._finish(terms["loss"])

    def fused_loss_moment(self):
        if not hasattr(self, "adaptive"):
            st = make_strategy("loss_moment", self.speed.schedule, importance_weights=True, update_every=1)
            self.adaptive = FusedSpeeD(self.speed.schedule, st, device=self.device, seed=self.seed)
        return self.fused_speed(self.adaptive)

    def fused_adaptive_speed(self):
        if not hasattr(self, "adaptive_speed"):
            st = make_strategy("adaptive_speed", self.speed.schedule, k=5.0, tau=700, lam=0.6, dual=True, history=2,
                               update_every=1)
            self.adaptive_speed = FusedSpeeD(self.speed.schedule, st, device=self.device, seed=self.seed)
        return self.fused_speed(self.adaptive_speed)


def check_fused_against_eager(schedule, device) -> float:
    """|fused - eager| of the objective on the same t and noise (relative); raises when they disagree."""
    torch.manual_seed(0)
    x0 = torch.rand(16, 4, 8, 8, device=device) * 2 - 1
    out = 0.5 * torch.randn(16, 8, 8, 8, device=device)
    s = Step(None, x0, None, schedule, device, with_model=False)
    s.out = out.clone().requires_grad_()
    diffusion = s.diffusion
    terms = diffusion.training_losses(lambda x_t, t, y: s.out, x0, None, s.fused, step=3)
    t = terms["t"]
    eps = noise_ref(x0.shape, s.fused.seed, 3, 0, device)
    x_t = diffusion.q_sample(x0, t, eps)
    mse = mean_flat((out[:, :4] - eps) ** 2)
    vb = diffusion.vb_terms_bpd(out, x0, x_t, t)
    ref = (s.weights[t] * mse + vb).mean()
    err = abs(float(terms["loss"].detach()) - float(ref)) / abs(float(ref))
    if err > 1e-5:
        raise AssertionError(f"fused objective {float(terms['loss'])} differs from the eager one {float(ref)}")
    return err


def cpu_section(args) -> tuple[list[dict], dict]:
    preset = load_preset("digits", CONFIGS)
    cfg = DiTConfig(input_size=8, in_channels=1, num_classes=10, **preset.dit)
    B = preset.global_batch
    schedule = NoiseSchedule.make(**preset.schedule)
    x, y = digits_arrays()
    x0 = torch.from_numpy(x[:B]).contiguous()  # (B, 1, 8, 8)
    y0 = torch.from_numpy(y[:B]).contiguous()
    torch.manual_seed(0)
    model = DiT(cfg)
    rounds = 3 if args.quick else args.rounds
    rows, extra = [], {}
    per_tier = {}
    for tier, with_model in (("step", True), ("objective", False)):
        step = Step(model, x0, y0, schedule, "cpu", with_model=with_model)
        fns = {"eager-uniform": step.eager_uniform, "eager-speed": step.eager_speed, "fused-speed": step.fused_speed,
               "fused-loss-moment": step.fused_loss_moment, "fused-adaptive-speed": step.fused_adaptive_speed}
        if with_model and args.cpu_compile:
            torch.manual_seed(0)
            compiled = Step(torch.compile(DiT(cfg)), x0, y0, schedule, "cpu")
            start = time.perf_counter()
            compiled.fused_speed()  # compiles
            extra["cpu_compile_s"] = time.perf_counter() - start
            fns["fused-speed-compiled"] = compiled.fused_speed
        times = time_round_robin(fns, "cpu", warmup=1 if args.quick else 5, iters=rounds,
                                 max_seconds=args.max_seconds)
        per_tier[tier] = {k: percentiles_ms(v) for k, v in times.items()}
        base = per_tier[tier]["eager-uniform"]["ms_p50"]
        for name, pct in per_tier[tier].items():
            rows.append({"name": f"digits {tier}", "variant": name, "backend": step.fused.backend if "fused" in name
                         else "torch", "shape": list(x0.shape), "dtype": "float32", **pct,
                         "speedup_vs_eager": base / pct["ms_p50"]})
    step_base = per_tier["step"]["eager-uniform"]["ms_p50"]
    extra["speed_overhead_step_pct"] = 100 * (per_tier["step"]["fused-speed"]["ms_p50"] - step_base) / step_base
    extra["speed_overhead_objective_pct_of_step"] = 100 * (
        per_tier["objective"]["fused-speed"]["ms_p50"] - per_tier["objective"]["eager-uniform"]["ms_p50"]) / step_base
    extra["reference_speed_overhead_step_pct"] = 100 * (
        per_tier["step"]["eager-speed"]["ms_p50"] - step_base) / step_base
    fused = per_tier["step"]["fused-speed"]["ms_p50"]
    extra["static_speed_step_ms"] = fused
    for key, variant, adaptive in (("loss_moment", "fused-loss-moment", step.adaptive),
                                   ("adaptive_speed", "fused-adaptive-speed", step.adaptive_speed)):
        extra[f"{key}_every_step_overhead_pct"] = 100 * (per_tier["step"][variant]["ms_p50"] - fused) / fused
        every = per_tier["objective"][variant]["ms_p50"] - per_tier["objective"]["fused-speed"]["ms_p50"]
        extra[f"{key}_every_step_objective_pct_of_step"] = 100 * every / fused
        rebuild = time_rebuild(adaptive, 20 if args.quick else 200)
        extra[f"{key}_rebuild_ms"] = rebuild
        extra[f"{key}_update_every_100_overhead_pct"] = 100 * (max(every - rebuild, 0.0) + rebuild / 100) / fused
    extra["digits_model"] = cfg.to_dict()
    extra["digits_batch"] = B
    return rows, extra


def time_rebuild(fused, n: int) -> float:
    """Median ms of one adaptive table rebuild (P from the histories, the alias sweep, w) on its device."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fused._adapt()
        if fused.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def gpu_section(args) -> tuple[list[dict], dict]:
    """DiT-XL/2 with the trainer's GPU set-up (see the module docstring): ms/step, img/s, MFU."""
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if k in name), None)
    cfg = DiTConfig.named("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    flops = flops_per_image(cfg)["train_gflops"] * 1e9
    schedule = NoiseSchedule.make("linear")
    compiled = not args.no_compile
    rows, extra = [], {"gpu": name, "peak_bf16_flops": peak, "train_flops_per_image": flops, "compiled": compiled,
                       "precision": "fp32 weights, bf16 autocast forward", "attention": "sdpa"}
    batches = [8] if args.quick else [int(b) for b in args.gpu_batches.split(",")]
    for B in batches:
        torch.manual_seed(0)
        model = DiT(cfg).to(device)
        if compiled:
            model.compile(fullgraph=True)
        x0 = torch.randn(B, 4, 32, 32, device=device)
        y = torch.randint(0, 1000, (B,), device=device)
        step = Step(model, x0, y, schedule, device, with_model=True, autocast=True)
        fns = {"eager-uniform": step.eager_uniform, "fused-speed": step.fused_speed}
        torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            for fn in fns.values():  # the first calls compile (timed apart)
                fn()
            torch.cuda.synchronize()
            extra[f"first_steps_s_b{B}"] = time.perf_counter() - start
            times = time_round_robin(fns, device, warmup=3, iters=3 if args.quick else 20,
                                     max_seconds=args.max_seconds)
        except torch.OutOfMemoryError as exc:
            rows.append({"name": f"DiT-XL/2 b{B}", "variant": "oom", "error": str(exc).splitlines()[0]})
            continue
        finally:
            peak_mem = torch.cuda.max_memory_allocated() / 2**30
            del step, model
            torch.cuda.empty_cache()
        base = percentiles_ms(times["eager-uniform"])["ms_p50"]
        for variant, ts in times.items():
            pct = percentiles_ms(ts)
            img_s = B / (pct["ms_p50"] / 1e3)
            rows.append({"name": f"DiT-XL/2 b{B}", "variant": variant, "backend": "triton" if "fused" in variant
                         else "torch", "shape": [B, 4, 32, 32], "dtype": "bf16-autocast", **pct,
                         "speedup_vs_eager": base / pct["ms_p50"], "img_per_s": img_s,
                         "mfu": img_s * flops / peak if peak else None, "peak_mem_gib": peak_mem})
    return rows, extra


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    schedule = NoiseSchedule.make("linear")
    agree = check_fused_against_eager(schedule, "cpu")
    rows, extra = ([], {"cpu": "skipped: --no-cpu"}) if args.no_cpu else cpu_section(args)
    extra["fused_vs_eager_rel_err"] = agree
    if torch.cuda.is_available() and not args.no_gpu:
        check_fused_against_eager(schedule, "cuda")
        gpu_rows, gpu_extra = gpu_section(args)
        rows += gpu_rows
        extra.update(gpu_extra)
    else:
        extra["gpu"] = "skipped: no CUDA device" if not torch.cuda.is_available() else "skipped: --no-gpu"
    info = meta(args.threads, extra)
    print(f"{info['machine']}, {args.threads} threads, load average {info['loadavg_start']}")
    print_table(rows, [("name", "benchmark"), ("variant", "variant"), ("backend", "backend"), ("ms_p20", "ms p20"),
                       ("ms_p50", "ms p50"), ("ms_p80", "ms p80"), ("speedup_vs_eager", "vs eager-uniform"),
                       ("img_per_s", "img/s"), ("mfu", "MFU")])
    if not args.no_cpu:
        print(f"SpeeD overhead vs eager-uniform, digits preset: step {extra['speed_overhead_step_pct']:+.2f}% "
              f"(objective-only difference: {extra['speed_overhead_objective_pct_of_step']:+.2f}% of the step); "
              f"the reference implementation's SpeeD step: {extra['reference_speed_overhead_step_pct']:+.2f}%")
        for key in ("loss_moment", "adaptive_speed"):
            print(f"{key} (rebuilt every step, the worst case) vs static SpeeD, digits preset: step "
                  f"{extra[f'{key}_every_step_overhead_pct']:+.2f}% (objective-only difference: "
                  f"{extra[f'{key}_every_step_objective_pct_of_step']:+.2f}% of the step); one rebuild "
                  f"{extra[f'{key}_rebuild_ms']:.3f} ms; at update_every 100: "
                  f"{extra[f'{key}_update_every_100_overhead_pct']:+.2f}%")
    print(f"GPU: {extra['gpu']}")
    for r in rows:
        if r.get("mfu") is not None:
            print(f"{r['name']} {r['variant']}: {r['ms_p50']:.1f} ms/step, {r['img_per_s']:.0f} img/s, "
                  f"MFU {100 * r['mfu']:.1f}%, peak memory {r['peak_mem_gib']:.1f} GiB")
    write_json(args.out, info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
