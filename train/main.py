"""`deepspeed train/main.py [flags]`: train a DiT or a U-Net (`--model unet-small`, ...) with SpeeD under DeepSpeed ZeRO.

With no arguments it trains the `digits` preset (scikit-learn's 8x8 digits, a small
class-conditional DiT, SpeeD sampling and weighting) to completion on whatever the machine
has, CPU included, and writes config.json, metrics.jsonl, TensorBoard events, checkpoints,
samples.png and loss.png to runs/digits-speed-seed0. Presets and DeepSpeed JSON configs are
in train/configs; `--help` lists the flags. Also runs without the launcher (`python
train/main.py`, one process) and under torchrun.
"""

import os
import sys

# OpenMP threads that sleep instead of spinning when idle: on a CPU shared with other processes
# (or with the other ranks of this job) spinning threads can slow a step down tenfold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from speed_fast.training.main import main  # noqa: E402  (after the OpenMP setting, which torch reads on import)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], configs_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")))
