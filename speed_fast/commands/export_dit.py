"""`speed-fast export-dit RUN OUT.pt`: a trained run's weights as a facebookresearch/DiT checkpoint.

The file is a plain state dict in DiT's naming (see `speed_fast.models.interop`), EMA weights by
default, which DiT's `sample.py` and `sample_ddp.py` load with `--ckpt OUT.pt` (their
`find_model` takes a plain state dict as it is). DiT's samplers assume its diffusion set-up
(linear betas 1e-4..0.02, T = 1000, learned sigma); a run with another schedule is exported
with a warning, since DiT would sample it with the wrong one.
"""

from __future__ import annotations

import os
import sys

HELP = "write a run's EMA weights as a facebookresearch/DiT checkpoint (for DiT's sample.py)"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by train/main.py")
    p.add_argument("out", help="output .pt file")
    p.add_argument("--checkpoint", help="checkpoint tag (e.g. step-00010000) or path; default: the newest")
    p.add_argument("--raw", action="store_true", help="the raw model weights instead of the EMA")


def run(args) -> int:
    import torch

    from ..models.interop import dit_model_name, to_dit_state_dict
    from ..training.checkpoint import load_for_inference

    model, config, _, meta = load_for_inference(args.run, ema=not args.raw, checkpoint=args.checkpoint)
    cfg = model.config
    name = dit_model_name(cfg)
    state = to_dit_state_dict(model.state_dict(), cfg)
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        raise ValueError(f"{args.out} is a directory; expected a file path such as {args.out}/dit.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out)
    schedule = config["train"]["schedule"]
    if (schedule.get("kind"), schedule.get("T"), schedule.get("beta_start"), schedule.get("beta_end")) != \
            ("linear", 1000, 1e-4, 0.02):
        print(f"speed-fast export-dit: warning: the run used the schedule {schedule}; DiT's samplers assume "
              "linear 1e-4..0.02 with T=1000", file=sys.stderr)
    which = "raw" if args.raw else "EMA"
    print(f"wrote {out}: {name}, {which} weights, {len(state)} tensors, {meta.get('num_classes', cfg.num_classes)} "
          f"classes")
    print(f"sample with DiT: python sample.py --model {name} --image-size {8 * cfg.input_size} "
          f"--num-classes {cfg.num_classes} --ckpt {out}")
    return 0
