"""Rank script for tests/test_faults.py: `deepspeed --num_gpus 2 tests/preempt_worker.py OUT`.

Each rank installs speed_fast.training.preemption (as train/main.py does), writes OUT/ready-<rank>
holding its pid, waits for a stop request (at most 120 s), then writes OUT/stopped-<rank> holding
the reason and exits 0: a stand-in for "finish the step, save, exit" without a model.
"""

import os
import sys
import time

from speed_fast.training import preemption

out, rank = sys.argv[-1], os.environ["RANK"]
preemption.install()
with open(os.path.join(out, f"ready-{rank}"), "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 120
while not preemption.requested() and time.monotonic() < deadline:
    time.sleep(0.05)
with open(os.path.join(out, f"stopped-{rank}"), "w") as f:
    f.write(preemption.reason() or "timed out")
