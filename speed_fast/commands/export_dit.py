"""`speed-fast export-dit RUN OUT.pt`: a trained run's weights as a facebookresearch/DiT checkpoint.

The file is a plain state dict in DiT's naming (see `speed_fast.models.interop`), EMA weights by
default, which DiT's `sample.py` and `sample_ddp.py` load with `--ckpt OUT.pt` (their
`find_model` takes a plain state dict as it is). DiT's samplers assume its diffusion set-up
(linear betas 1e-4..0.02, T = 1000, learned sigma); a run with another schedule is exported
with a warning, since DiT would sample it with the wrong one.
"""

from __future__ import annotations

import sys

HELP = "write a run's EMA weights as a facebookresearch/DiT checkpoint (for DiT's sample.py)"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by train/main.py")
    p.add_argument("out", help="output .pt file (outside any run directory)")
    p.add_argument("--checkpoint", help="checkpoint tag (e.g. step-00010000) or path; default: the newest")
    p.add_argument("--raw", action="store_true", help="the raw model weights instead of the EMA")
    p.add_argument("--force", action="store_true", help="replace OUT when it exists")


def run(args) -> int:
    from ..export import export_dit

    info = export_dit(args.run, args.out, checkpoint=args.checkpoint, raw=args.raw, force=args.force)
    if not info["dit_schedule"]:
        print(f"speed-fast export-dit: warning: the run used the schedule {info['schedule']}; DiT's samplers assume "
              "linear 1e-4..0.02 with T=1000", file=sys.stderr)
    cfg, out = info["config"], info["path"]
    print(f"wrote {out}: {info['name']}, {'raw' if args.raw else 'EMA'} weights, {info['tensors']} tensors, "
          f"{info['num_classes']} classes")
    print(f"sample with DiT: python sample.py --model {info['name']} --image-size {8 * cfg.input_size} "
          f"--num-classes {cfg.num_classes} --ckpt {out}")
    return 0
