"""Worker for tests/test_train_zero.py, launched as `deepspeed --num_gpus 2 tests/ds_zero_worker.py OUT DATA`.

For ZeRO stages 0, 1, 2 and 3 it builds the real trainer (DeepSpeed engine, sharded EMA, fused
SpeeD step) on a tiny DiT and, on a fixed batch with a fixed noise draw (micro-step reset
every step, so the objective is deterministic):
  * trains 12 steps and records the loss (it must go down);
  * tracks an independent EMA of the gathered fp32 master weights and compares it with the
    sharded EMA;
  * feeds a NaN sample on rank 1 only: every rank must skip the update (weights and EMA
    bitwise unchanged) and count it;
  * saves a checkpoint, takes one more step, then rebuilds a second trainer from the
    checkpoint and takes the same step: weights, EMA, counters and the step's loss must match
    exactly;
  * counts the calls that would make a GPU host wait (tests/sync_counter.py) in the 12 training
    steps, in the log records and in the checkpoint save, by who made them.
Rank 0 writes OUT/results.json; the test asserts on it.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from sync_counter import SyncCounter

from speed_fast.data.digits import digits_arrays
from speed_fast.training.config import TrainConfig, resolve
from speed_fast.training.trainer import Trainer

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train", "configs")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max().detach()) for k in a)


def main(out_dir: str, data: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    x_all, y_all = digits_arrays()
    x = torch.from_numpy(x_all[rank * 4:(rank + 1) * 4]).contiguous()  # (4, 1, 8, 8): this rank's fixed batch
    y = torch.from_numpy(y_all[rank * 4:(rank + 1) * 4]).contiguous()
    results = {}
    counter = SyncCounter().install()
    for stage in (0, 1, 2, 3):
        counter.events.clear()
        cfg = TrainConfig(preset="test-zero", model="custom",
                          dit=dict(hidden_size=32, depth=2, num_heads=2, patch_size=2), data=data,
                          global_batch=16, micro_batch=4, lr=3e-3, grad_clip=1.0, ema_decay=0.5, zero_stage=stage,
                          run_dir=os.path.join(out_dir, f"zero{stage}"), max_steps=100, num_workers=1,
                          progress=False)
        plan = resolve(cfg, world, CONFIGS, cuda_available=False)
        tr = Trainer(plan, rank)
        fixed = [(x, y)] * plan.grad_accum

        ref_ema = tr.ema.full_master_state_dict()
        losses = []
        for _ in range(12):
            tr.micro_step = 0  # same t, eps and label dropout every step: a deterministic objective
            with counter.phase("step"):
                tr.train_step(iter(fixed))
            with counter.phase("record"):
                losses.append(tr.record()["loss"])
            master = tr.ema.full_master_state_dict()
            ref_ema = {k: 0.5 * ref_ema[k] + 0.5 * master[k] for k in master}
        ema_err = max_diff(tr.ema.full_state_dict(), ref_ema)

        bad_x = x.clone()
        if rank == 1:
            bad_x[0, 0, 0, 0] = float("nan")
        before, ema_before = tr.ema.full_master_state_dict(), tr.ema.full_state_dict()
        tr.micro_step = 0
        tr.train_step(iter([(bad_x, y)] + fixed[1:]))
        nan_rec = tr.record()
        nan_weights_diff = max_diff(before, tr.ema.full_master_state_dict())
        nan_ema_diff = max_diff(ema_before, tr.ema.full_state_dict())
        tr.micro_step = 0
        tr.train_step(iter(fixed))
        after_nan = tr.record()

        with counter.phase("save"):
            path = tr.save()
        saved = {"master": tr.ema.full_master_state_dict(), "ema": tr.ema.full_state_dict(),
                 "counters": [tr.step, tr.micro_step, int(tr.log_stats.read()["skipped_steps"])]}
        tr.train_step(iter(fixed))
        next_rec = tr.record()
        next_master = tr.ema.full_master_state_dict()
        param_tensors = len(list(tr.engine.module.parameters()))
        del tr

        tr2 = Trainer(plan, rank, resume_from=path)
        loaded_master_diff = max_diff(saved["master"], tr2.ema.full_master_state_dict())
        loaded_ema_diff = max_diff(saved["ema"], tr2.ema.full_state_dict())
        counters = [tr2.step, tr2.micro_step, int(tr2.log_stats.read()["skipped_steps"])]
        tr2.train_step(iter(fixed))
        resumed_rec = tr2.record()
        resumed_master_diff = max_diff(next_master, tr2.ema.full_master_state_dict())
        del tr2
        results[f"zero{stage}"] = {
            "losses": losses, "ema_err": ema_err,
            "nan_nonfinite": nan_rec["nonfinite"], "nan_skipped": nan_rec["skipped_steps"],
            "nan_weights_diff": nan_weights_diff, "nan_ema_diff": nan_ema_diff,
            "after_nan_loss": after_nan["loss"], "after_nan_nonfinite": after_nan["nonfinite"],
            "loaded_master_diff": loaded_master_diff, "loaded_ema_diff": loaded_ema_diff,
            "counters_saved": saved["counters"], "counters_loaded": counters,
            "next_loss": next_rec["loss"], "resumed_loss": resumed_rec["loss"],
            "resumed_master_diff": resumed_master_diff, "checkpoint": path,
            "param_tensors": param_tensors,
            "syncs": {phase: counter.counts(phase) for phase in ("step", "record", "save")},
            "sync_sites": {phase: counter.sites(phase) for phase in ("step", "record", "save")},
        }
        dist.barrier()
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
