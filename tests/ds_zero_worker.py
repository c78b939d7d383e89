"""Worker for tests/test_train_zero.py, launched as `deepspeed --num_gpus 2 tests/ds_zero_worker.py OUT DATA [unet]`.

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
    steps, in the log records and in the checkpoint save, by who made them;
  * does the same count over 6 steps of CLTS, of loss_moment and of adaptive_speed (adaptive P(t)s
    rebuilt on the device from both ranks' losses), and compares the adapted tables of the two ranks;
  * under ZeRO-3, evaluates the EMA with the trainer's evaluator on both ranks (each samples half
    the fixed-seed set) and with a one-rank evaluator on rank 0;
  * starts ZeRO-2 from a facebookresearch/DiT-format file (--init-from);
  * trains ZeRO-1 with --precision bf16 (the GPU policy: bf16 autocast over fp32 weights) and
    records the dtypes inside a block, DeepSpeed's data types and the first losses.
With `unet` the model is a tiny U-Net (speed_fast.models.unet) instead: ZeRO-2 and ZeRO-3 only, 6
steps each (the same checks of loss, EMA, NaN skip, checkpoint round trip, syncs; distributed
evaluation under ZeRO-3) and the bf16 policy under ZeRO-2; no CLTS, loss_moment or --init-from.
Rank 0 writes OUT/results.json; the test asserts on it.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from sync_counter import SyncCounter

from speed_fast.data.digits import digits_arrays
from speed_fast.evaluation import TrainingEvaluator
from speed_fast.models import DiT
from speed_fast.training import artefacts
from speed_fast.training.config import TrainConfig, resolve
from speed_fast.training.trainer import Trainer

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train", "configs")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max().detach()) for k in a)


# The tiny U-Net of the `unet` job: 2 levels (8x8, 4x4), widths 16 and 32, attention at 4x4 and in the middle.
TINY_UNET = dict(base_channels=16, channel_mult=[1, 2], layers_per_block=1, attention_levels=[1], norm_groups=8)


def main(out_dir: str, data: str, family: str = "dit") -> None:
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    x_all, y_all = digits_arrays()
    x = torch.from_numpy(x_all[rank * 4:(rank + 1) * 4]).contiguous()  # (4, 1, 8, 8): this rank's fixed batch
    y = torch.from_numpy(y_all[rank * 4:(rank + 1) * 4]).contiguous()
    results = {}
    counter = SyncCounter().install()

    unet = family == "unet"
    model = (dict(model="unet-custom", unet=TINY_UNET) if unet else
             dict(model="custom", dit=dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)))
    stages, n_steps = ((2, 3), 6) if unet else ((0, 1, 2, 3), 12)

    def make_plan(stage, **overrides):
        fields = dict(preset="test-zero", **model,
                      data=data, global_batch=16, micro_batch=4, lr=3e-3, grad_clip=1.0, ema_decay=0.5,
                      zero_stage=stage, run_dir=os.path.join(out_dir, f"zero{stage}"), max_steps=100, num_workers=1,
                      progress=False, eval_samples=10, eval_sampler="ddim5")
        cfg = TrainConfig(**{**fields, **overrides})
        return resolve(cfg, world, CONFIGS, cuda_available=False)

    for stage in stages:
        counter.events.clear()
        plan = make_plan(stage)
        tr = Trainer(plan, rank)
        fixed = [(x, y)] * plan.grad_accum

        ref_ema = tr.ema.full_master_state_dict(dst=None)
        losses = []
        for _ in range(n_steps):
            tr.micro_step = 0  # same t, eps and label dropout every step: a deterministic objective
            with counter.phase("step"):
                tr.train_step(iter(fixed))
            with counter.phase("record"):
                losses.append(tr.record()["loss"])
            master = tr.ema.full_master_state_dict(dst=None)
            ref_ema = {k: 0.5 * ref_ema[k] + 0.5 * master[k] for k in master}
        ema_err = max_diff(tr.ema.full_state_dict(dst=None), ref_ema)
        on_rank0 = tr.ema.full_state_dict()  # the checkpoint's gather: rank 0 only, nothing elsewhere
        assert (max_diff(on_rank0, ref_ema) <= 1e-7) if rank == 0 else on_rank0 == {}, (rank, list(on_rank0)[:3])

        bad_x = x.clone()
        if rank == 1:
            bad_x[0, 0, 0, 0] = float("nan")
        before, ema_before = tr.ema.full_master_state_dict(dst=None), tr.ema.full_state_dict(dst=None)
        tr.micro_step = 0
        tr.train_step(iter([(bad_x, y)] + fixed[1:]))
        nan_rec = tr.record()
        nan_weights_diff = max_diff(before, tr.ema.full_master_state_dict(dst=None))
        nan_ema_diff = max_diff(ema_before, tr.ema.full_state_dict(dst=None))
        tr.micro_step = 0
        tr.train_step(iter(fixed))
        after_nan = tr.record()

        with counter.phase("save"):
            path = tr.save()
        saved = {"master": tr.ema.full_master_state_dict(dst=None), "ema": tr.ema.full_state_dict(dst=None),
                 "counters": [tr.step, tr.micro_step, int(tr.log_stats.read()["skipped_steps"])]}
        tr.train_step(iter(fixed))
        next_rec = tr.record()
        next_master = tr.ema.full_master_state_dict(dst=None)
        param_tensors = len(list(tr.engine.module.parameters()))
        if stage == 3:  # distributed evaluation of the (partitioned) EMA: 2 ranks vs 1
            results["eval"] = distributed_eval(plan, tr, rank)
        del tr

        tr2 = Trainer(plan, rank, resume_from=path)
        loaded_master_diff = max_diff(saved["master"], tr2.ema.full_master_state_dict(dst=None))
        loaded_ema_diff = max_diff(saved["ema"], tr2.ema.full_state_dict(dst=None))
        counters = [tr2.step, tr2.micro_step, int(tr2.log_stats.read()["skipped_steps"])]
        tr2.train_step(iter(fixed))
        resumed_rec = tr2.record()
        resumed_master_diff = max_diff(next_master, tr2.ema.full_master_state_dict(dst=None))
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
            "uploads": counter.counts("step", kind="h2d"),
            "sync_sites": {phase: counter.sites(phase) for phase in ("step", "record", "save")},
        }
        dist.barrier()
    if unet:
        counter.uninstall()
        results["bf16"] = bf16_policy(make_plan(2, precision="bf16", run_dir=os.path.join(out_dir, "bf16")), rank,
                                      x, y, n_steps)
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
        return
    counter.events.clear()
    results["clts"] = clts_syncs(make_plan(0, strategy="clts", strategy_params={"ramp_steps": 100},
                                           run_dir=os.path.join(out_dir, "clts")), rank, x, y, counter)
    counter.events.clear()
    results["loss_moment"] = adaptive_syncs(
        make_plan(0, strategy="loss_moment", run_dir=os.path.join(out_dir, "loss_moment"),
                  strategy_params={"bins": 4, "history": 2, "update_every": 2, "importance_weights": True}),
        rank, x, y, counter)
    counter.events.clear()
    # adaptive_speed: SpeeD+dual whose k and tau move (4 bins: 0-249 and 250-499 below tau = 700, 750-999
    # above it, each with losses in every window of 64; the updates after steps 4 and 6 move both).
    results["adaptive_speed"] = adaptive_syncs(
        make_plan(0, strategy="adaptive_speed", run_dir=os.path.join(out_dir, "adaptive_speed"),
                  strategy_params={"bins": 4, "history": 2, "update_every": 2, "dual": True}),
        rank, x, y, counter)
    counter.uninstall()
    results["init_from"] = init_from(make_plan, out_dir, rank)
    results["bf16"] = bf16_policy(make_plan(1, precision="bf16", run_dir=os.path.join(out_dir, "bf16")), rank,
                                  x, y, len(results["zero1"]["losses"]))
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


def distributed_eval(plan, tr, rank) -> dict:
    """The trainer's evaluator on 2 ranks (each samples half the set) against 1 rank on the same model."""
    evaluator = artefacts.make_evaluator(plan, rank, tr.device, tr.torch_threads)
    model = artefacts.ema_model(plan, tr.ema, rank, tr.device, everywhere=True)
    two = evaluator.evaluate(model, tr.step)
    if rank != 0:
        assert two is None, two  # only rank 0 gets the record
        return {}
    one = TrainingEvaluator((evaluator.ref_mu, evaluator.ref_sigma), plan.schedule, n_samples=evaluator.n_samples,
                            rank=0, world=1, **evaluator.sample_kwargs).evaluate(model, tr.step)
    return {"two_ranks": two, "one_rank": one, "shares": [len(evaluator.share(r)) for r in range(2)]}


def clts_syncs(plan, rank, x, y, counter) -> dict:
    """The same counts over 4 steps of a step-dependent P(t) (CLTS's ramp): the fused ops rebuild
    its alias table on the host and copy it to the device at every step (counted as theirs)."""
    tr = Trainer(plan, rank)
    fixed = [(x, y)] * plan.grad_accum
    for _ in range(4):
        with counter.phase("step"):
            tr.train_step(iter(fixed))
    return {"syncs": counter.counts("step"), "uploads": counter.counts("step", kind="h2d"),
            "sites": counter.sites("step")}


def adaptive_syncs(plan, rank, x, y, counter) -> dict:
    """The same counts over 6 steps of an adaptive strategy (its table and weights rebuilt on the device
    after steps 2, 4 and 6 from both ranks' losses), and whether both ranks hold the same adapted tables
    (and, for adaptive_speed, the same k and tau)."""
    tr = Trainer(plan, rank)
    fixed = [(x, y)] * plan.grad_accum
    start = tr.fused.prob.clone()
    for _ in range(6):
        with counter.phase("step"):
            tr.train_step(iter(fixed))
    tables = torch.cat([tr.fused.prob, tr.fused.alias.float(), tr.fused.weights])
    if tr.fused.strategy.name == "adaptive_speed":
        tables = torch.cat([tables, torch.stack([tr.fused.adaptive.k, tr.fused.adaptive.tau.double()]).float()])
    gathered = [torch.empty_like(tables) for _ in range(tr.world)]
    dist.all_gather(gathered, tables)
    out = {"syncs": counter.counts("step"), "uploads": counter.counts("step", kind="h2d"),
           "sites": counter.sites("step"), "ready": bool(tr.fused.adaptive.ready()),
           "adapted": not torch.equal(start, tr.fused.prob),
           "ranks_agree": all(torch.equal(gathered[0], g) for g in gathered[1:]),
           "counts": tr.fused.adaptive.counts.tolist()}
    if tr.fused.strategy.name == "adaptive_speed":
        out["k_tau"] = [float(tr.fused.adaptive.k), int(tr.fused.adaptive.tau)]
    return out


def init_from(make_plan, out_dir, rank) -> dict:
    """--init-from a facebookresearch/DiT-format file (written here from a perturbed model): the
    partitioned (ZeRO-2) weights and the EMA start at the file's weights on every rank."""
    path = os.path.join(out_dir, "dit-format.pt")
    plan = make_plan(2)
    torch.manual_seed(123)
    source = DiT(plan.model)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if rank == 0:
        sd = {("x_embedder.proj." + k.split(".")[1] if k.startswith("x_embedder.") else k): v
              for k, v in source.state_dict().items()}
        sd["pos_embed"] = source.pos_embed.clone()
        torch.save(sd, path)
    dist.barrier()
    tr = Trainer(make_plan(2, init_from=path, run_dir=os.path.join(out_dir, "init")), rank)
    want = source.state_dict()
    return {"master_diff": max_diff(tr.ema.full_master_state_dict(dst=None), want),
            "ema_diff": max_diff(tr.ema.full_state_dict(dst=None), want)}


def bf16_policy(plan, rank, x, y, steps) -> dict:
    """The GPU precision policy (bf16 autocast over fp32 weights) on CPU: dtypes seen inside the
    model during a training forward, the data types DeepSpeed runs with, and the first losses.
    A U-Net: its first ResNet block's convolution, the middle attention's query projection and the
    model's output."""
    tr = Trainer(plan, rank)
    seen = {}
    if hasattr(tr.engine.module, "blocks"):  # DiT
        block = tr.engine.module.blocks[0]
        hooks = [block.register_forward_hook(lambda m, inp, out: seen.update(residual_in=str(inp[0].dtype),
                                                                             residual_out=str(out.dtype))),
                 block.attn.register_forward_hook(lambda m, inp, out: seen.update(attn_out=str(out.dtype))),
                 block.attn.qkv.register_forward_hook(lambda m, inp, out: seen.update(qkv_out=str(out.dtype)))]
    else:  # U-Net (diffusers' UNet2DModel inside)
        unet = tr.engine.module.unet
        hooks = [unet.down_blocks[0].resnets[0].conv1.register_forward_hook(
                     lambda m, inp, out: seen.update(conv_out=str(out.dtype))),
                 unet.mid_block.attentions[0].to_q.register_forward_hook(
                     lambda m, inp, out: seen.update(q_out=str(out.dtype))),
                 tr.engine.module.register_forward_hook(lambda m, inp, out: seen.update(model_out=str(out.dtype)))]
    fixed = [(x, y)] * plan.grad_accum
    losses = []
    for _ in range(steps):
        tr.micro_step = 0
        tr.train_step(iter(fixed))
        losses.append(tr.record()["loss"])
    for h in hooks:
        h.remove()
    params = {str(p.dtype) for p in tr.engine.module.parameters()}
    model_dtype, accum_dtype = tr.engine.get_data_types()
    return {"losses": losses, "dtypes": seen, "param_dtypes": sorted(params), "model_dtype": str(model_dtype),
            "grad_accum_dtype": str(accum_dtype), "autocast": tr.engine.torch_autocast_enabled()}


if __name__ == "__main__":
    main(*sys.argv[1:])
