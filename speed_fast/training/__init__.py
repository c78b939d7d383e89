"""The DeepSpeed trainer behind `deepspeed train/main.py` (config, loop, EMA, checkpoints, logging).

`load_for_inference(run_dir, ema=True, device="cpu") -> (model, config, schedule, data_meta)`
loads a trained run for sampling without DeepSpeed.
"""

from .checkpoint import load_for_inference

__all__ = ["load_for_inference"]
