"""Precision benchmark: how exact is a DiT forward and backward under each bf16 policy (vs float64)?

    python benchmarks/bench_precision.py --out precision.json [--depth 12 --hidden 384 --gate 1e-3]

One DiT (default: 12 blocks, hidden 384, patch 2 on 4x32x32 latents, DiT-S/2's shape) with
adaLN-Zero modulations set to small random values, as in a model early in training (gates ~1e-3:
each block adds a small update to a residual stream of order 1). The same weights and batch run
in float64 (the reference) and under each policy:

  fp32               everything float32
  bf16-model         DeepSpeed's bf16 mode: weights, buffers (pos_embed) and therefore the residual
                     stream in bf16
  autocast-fp32-res  this trainer's policy: fp32 weights under torch.autocast(bf16): matmuls in bf16,
                     the residual stream (pos_embed added in fp32) stays float32
  autocast-bf16-res  the same autocast with the residual cast to bf16 (pos_embed.to(x.dtype), the
                     model before this policy)

Reported per policy: the relative error of each block's residual update (median and max over
blocks), of the model output, and of the gradient of an MSE loss (all parameters together).
Runs on CPU (bf16 autocast works there); --device cuda measures the GPU kernels' rounding.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import meta, print_table, write_json  # noqa: E402

from speed_fast.models import DiT, DiTConfig  # noqa: E402

POLICIES = ("fp32", "bf16-model", "autocast-fp32-res", "autocast-bf16-res")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--gate", type=float, default=1e-3, help="std of the blocks' adaLN modulation weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def build(args) -> DiT:
    cfg = DiTConfig(input_size=32, in_channels=4, hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                    patch_size=2, num_classes=1000)
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and "adaLN_modulation" in name:
                p.normal_(0, args.gate)
            elif "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.normal_(0, 0.02)
    return model


def run(model: DiT, x, t, y, target, policy: str, device):
    """(residual stream after the embedding and after each block, output, gradient) as float64."""
    model = model.to(device)
    states = []
    autocast = policy.startswith("autocast")
    dtype = {"fp64": torch.float64, "bf16-model": torch.bfloat16}.get(policy, torch.float32)
    x = x.to(device, dtype)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        h = model.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D)
        h = h + (model.pos_embed.to(h.dtype) if policy == "autocast-bf16-res" else model.pos_embed)
        keep = torch.zeros(y.shape[0], dtype=torch.bool, device=device)  # no random label dropout: same labels
        c = model.t_embedder(t.to(device)) + model.y_embedder(y.to(device), keep)
        states.append(h.detach().double())
        for block in model.blocks:
            h = block(h, c)
            states.append(h.detach().double())
        out = model.unpatchify(model.final_layer(h, c))
    loss = (out.double() - target.to(device)).square().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grad = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]).cpu()
    return [s.cpu() for s in states], out.detach().double().cpu(), grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = build(args)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, 32, 32, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    target = torch.randn(args.batch, 8, 32, 32, generator=g, dtype=torch.float64)
    ref_states, ref_out, ref_grad = run(copy.deepcopy(base).double(), x, t, y, target, "fp64", args.device)
    ref_updates = [b - a for a, b in zip(ref_states, ref_states[1:])]
    rows = []
    for policy in POLICIES:
        model = copy.deepcopy(base)
        if policy == "bf16-model":
            model = model.bfloat16()  # what DeepSpeed's bf16 mode does to the module (buffers included)
        states, out, grad = run(model, x, t, y, target, policy, args.device)
        updates = torch.tensor([rel(b - a, r) for a, b, r in zip(states, states[1:], ref_updates)])
        rows.append({"name": f"DiT d{args.depth} h{args.hidden}", "policy": policy,
                     "residual_dtype": "bfloat16" if policy in ("bf16-model", "autocast-bf16-res") else "float32",
                     "update_rel_err_median": float(updates.median()), "update_rel_err_max": float(updates.max()),
                     "output_rel_err": rel(out, ref_out), "grad_rel_err": rel(grad, ref_grad)})
    info = meta(args.threads, {"device": args.device, "gate_std": args.gate, "batch": args.batch,
                               "reference": "float64 forward and backward of the same weights"})
    print(f"{info['machine']}, {args.threads} threads, load average {info['loadavg_start']}")
    shown = [{k: f"{v:.2e}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print_table(shown, [("policy", "policy"), ("residual_dtype", "residual"),
                       ("update_rel_err_median", "block update err (median)"),
                       ("update_rel_err_max", "block update err (max)"), ("output_rel_err", "output err"),
                       ("grad_rel_err", "gradient err")])
    write_json(args.out, info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
