"""The training loop of one rank: the fused SpeeD step, EMA, checkpoints, logging.

One optimizer step = `grad_accum` micro-batches per rank. Per micro-batch (global micro-step m,
rank r, micro batch B):

    t, x_t   = fused.sample_and_noise(x0, step=m, offset=r * B)     # alias draw + Philox noise
    out      = engine(x_t, t, y, drop)                             # drop: label dropout from (seed, m)
               engine(x_t, t, tokens, pooled)                      # a text model: captions dropped from (seed, m)
    loss     = mean_b w(t_b) mse_b + mean_b vb_b                   # fused weighted MSE + VB
    engine.backward(loss)

then one all-reduce of the step's named statistics (`stats.STEP_FIELDS`: loss sums, per-area
sums and counts, a non-finite count) gives every rank the same view of the step, on the device:
if any rank saw a non-finite loss the optimizer update and the EMA update are cancelled
everywhere by a device flag (counted in `skipped_steps`). An adaptive time-step strategy
(`loss_moment`) then gets every rank's per-sample (t, unweighted MSE) of the applied step (one
all-gather on the device) and rebuilds its alias table on the device every `update_every` steps
(`FusedSpeeD.observe` / `end_step`); its statistics and tables are checkpointed (sampler.pt).
Nothing in a step waits for the device: the statistics are added up in a log window on the
device and read back once per log line (and per checkpoint); label-dropout masks reach the device in chunks, asynchronously. A
SIGTERM/SIGINT seen by any rank is agreed on through a CPU all-reduce each step (it never
waits for the device), and all ranks save a checkpoint and exit together. A run of
--max-nonfinite non-finite steps is noticed at the next log line or checkpoint (no update is
applied meanwhile).

Everything random is a function of (seed, step), or is saved: the noise and time steps come from the
counter RNG at the micro-step, label dropout and a text model's caption dropout (a dropped sample's
tokens and pooled embedding replaced on the device by the null caption's, read from the data's
sidecar) from generators seeded with (seed, micro-step), the data order from (seed, epoch) and the
loader's position. A resumed run therefore computes the same losses as the uninterrupted one
(exactly, on CPU in fp32); the checkpoint keeps the open log window, so records match for any
--log-every.

The engine is built in `engine.py`; config.json, the evaluator and the end-of-run grid and
plots are `artefacts.py`.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from ..diffusion import GaussianDiffusion
from ..models.registry import is_text_model
from ..ops import FusedSpeeD
from . import artefacts
from . import checkpoint as ckpt
from . import preemption
from .config import Plan
from .ema import ShardedEMA
from .engine import build_engine
from .label_dropout import CAPTION_DROP_STREAM, LabelDropout
from .metrics import MetricsLogger
from .stats import LOG_FIELDS, STEP_FIELDS, SUMMED_SIZE, WINDOW_FIELDS, Stats, window_record


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class Trainer:
    """One rank of a training job: builds the engine from a validated Plan, optionally restores a
    checkpoint, and trains with `fit()` (or step by step with `train_step` and `record`, as the
    tests do).

    rank / local_rank come from the launcher's environment, read once by `main`; the world size
    is the plan's (validated there, with the resumed checkpoint's)."""

    def __init__(self, plan: Plan, rank: int, local_rank: int = 0, resume_from: str | None = None):
        import deepspeed

        self.plan = plan
        cfg = self.cfg = plan.cfg
        self.rank, self.world, self.local_rank = rank, plan.world_size, local_rank
        if plan.use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if plan.use_cuda else "gloo", verbose=False)
        # The stop flag is agreed on the CPU: gloo's all-reduce never waits for the GPU's queue.
        self.cpu_group = dist.new_group(backend="gloo") if plan.use_cuda and self.world > 1 else None
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        if not plan.use_cuda and "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks of one node share its cores (torch would give each rank all of them).
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        self.torch_threads = torch.get_num_threads()

        self.engine, self.optimizer = build_engine(plan, self.device, init=resume_from is None)
        self.ema = ShardedEMA(self.engine.module, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.fused = FusedSpeeD(plan.schedule, plan.strategy, device=self.device, backend=cfg.backend, seed=cfg.seed)
        self.diffusion = GaussianDiffusion(plan.schedule, device=self.device, learn_sigma=plan.model.learn_sigma)
        self.text = is_text_model(plan.model)
        self.label_drop = LabelDropout(cfg.seed, 0.0 if self.text else plan.model.class_dropout_prob,
                                       plan.micro_batch, self.rank, self.world, self.device)
        if self.text:
            from ..data import null_text

            self.null_tokens, self.null_pooled = (v.to(self.device, torch.float32) for v in null_text(plan.data_meta))
            self.caption_drop = LabelDropout(cfg.seed, plan.caption_dropout, plan.micro_batch, self.rank, self.world,
                                             self.device, stream=CAPTION_DROP_STREAM)
        self.offset = self.rank * plan.micro_batch
        self.step_stats = Stats(STEP_FIELDS, self.device)
        self.log_stats = Stats(LOG_FIELDS, self.device)
        self.log_stats["limit_step"].fill_(-1)

        self.step = 0
        self.micro_step = 0
        self.window_start = 0  # the first step of the open log window
        self.last_ckpt: str | None = None
        self.loader = None
        self._loader_state: dict | None = None  # the data position to start from (set by a resume)
        if resume_from is not None:
            self._resume(resume_from)

    # ---- pieces -------------------------------------------------------------------------------

    def make_loader(self):
        from ..data import open_loader

        plan = self.plan
        self.loader = open_loader(plan.data_path, plan.micro_batch, loader=plan.loader, seed=self.cfg.seed,
                                  rank=self.rank, world_size=self.world, num_workers=self.cfg.num_workers,
                                  flip=self.cfg.flip, drop_last=True, device=self.device)
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)
        return self.loader

    def batches(self):
        """Endless (x, y) micro-batches for this rank ((x, y, tokens, pooled) on captioned data), epoch
        after epoch, from the loader's position."""
        return self.loader.forever()

    def lr_at(self, step: int) -> float:
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / w) if w else self.cfg.lr

    # ---- one optimizer step -------------------------------------------------------------------

    def _accumulate(self, terms: dict) -> None:
        """Add one micro-batch's loss terms to the step's statistics (on the device)."""
        stats = self.step_stats
        loss = terms["loss"].detach()
        B = terms["t"].shape[0]
        area_sum, area_n = self.fused.area_losses(terms["t"], terms["mse"])
        stats.add("loss", loss.double() * B)
        stats.add("mse", terms["mse"].double().sum())
        stats.add("vb", terms["vb"].double().sum())
        stats.add("samples", B)
        stats.add("weight", self.fused.weights[terms["t"]].double().sum())
        stats.add("nonfinite", (~torch.isfinite(loss)).double())
        stats.add("area_loss", area_sum)
        stats.add("area_samples", area_n)

    def train_step(self, batches) -> None:
        """One optimizer step over `grad_accum` micro-batches drawn from the iterator `batches`.
        Its statistics go to the log window on the device (see `record`); nothing is read back."""
        self.engine.train()
        self.step_stats.zero_()
        observed = []  # (t, unweighted mse) of each micro-batch, for an adaptive strategy
        for i in range(self.plan.grad_accum):
            if i:
                self.engine.step()  # DeepSpeed counts micro-batches in step(); it updates only at the boundary
            x, y, *text = next(batches)
            # fp32 latents in every precision: bf16 autocast casts them where a matmul reads them.
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)  # (B, C, H, W)
            y = y.to(self.device, non_blocking=True)  # (B,)
            m = self.micro_step
            if self.text:
                terms = self.diffusion.training_losses(self.engine, x, y, self.fused, step=m, offset=self.offset,
                                                       strategy_step=self.step, text=self._captions(*text, m))
            else:
                terms = self.diffusion.training_losses(self.engine, x, y, self.fused, step=m, offset=self.offset,
                                                       drop=self.label_drop(m), strategy_step=self.step)
            self.engine.backward(terms["loss"])
            self.micro_step += 1
            with torch.no_grad():
                self._accumulate(terms)
            observed.append((terms["t"], terms["mse"]))
        if self.world > 1:
            dist.all_reduce(self.step_stats.vector)  # enqueued on the device; nobody waits for it here
        skip = self.step_stats["nonfinite"] > 0  # (1,) bool, the same on every rank
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        # ZeRO-0 in fp32 clips without keeping the norm: take it from the reduced gradients here.
        grad_norm = self._grad_norm() if self.plan.ds_config["zero_optimization"]["stage"] == 0 else None
        if grad_norm is not None:
            skip = skip | ~torch.isfinite(grad_norm)
        self.optimizer.skip_if(skip)
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()  # a device tensor, a float or None (DeepSpeed)
            if isinstance(grad_norm, torch.Tensor):  # ZeRO cancels a step with a non-finite norm itself
                skip = skip | ~torch.isfinite(grad_norm.reshape(1))
        self.ema.update(skip)
        self._add_to_window(skip, grad_norm)
        if self.fused.adaptive is not None:
            self._observe(observed, skip)
        self.step += 1
        self.fused.end_step(self.step)  # an adaptive P(t) may get its new table (on the device)

    def _captions(self, tokens: torch.Tensor, pooled: torch.Tensor, micro_step: int) -> tuple:
        """(tokens fp32 [B, L, D], pooled fp32 [B, D]) on the device, with the captions that caption dropout
        picks at this micro-step replaced by the null caption's embedding (no host-device wait)."""
        tokens = tokens.to(self.device, dtype=torch.float32, non_blocking=True)  # (B, L, D)
        pooled = pooled.to(self.device, dtype=torch.float32, non_blocking=True)  # (B, D)
        drop = self.caption_drop(micro_step)  # (B,) bool, or None when the probability is 0
        if drop is None:
            return tokens, pooled
        return (torch.where(drop[:, None, None], self.null_tokens, tokens),
                torch.where(drop[:, None], self.null_pooled, pooled))

    @torch.no_grad()
    def _add_to_window(self, skip: torch.Tensor, grad_norm) -> None:
        """The step's sums into the log window when its update was applied, and the counters."""
        log, applied = self.log_stats, ~skip
        log.vector[:SUMMED_SIZE].add_(torch.where(applied, self.step_stats.vector[:SUMMED_SIZE], 0.0))
        if isinstance(grad_norm, torch.Tensor):
            log.add("grad_norm", torch.where(applied, grad_norm.reshape(1).double(), 0.0))
        elif grad_norm is not None:
            log.add("grad_norm", torch.where(applied, float(grad_norm), 0.0))
        skipped = skip.double()
        log.add("skipped", skipped)
        log.add("skipped_steps", skipped)
        streak = log["nonfinite_streak"]
        streak.mul_(skipped).add_(skipped)  # +1 on a skipped step, 0 otherwise
        limit = log["limit_step"]
        limit.copy_(torch.where((limit < 0) & (streak >= self.cfg.max_nonfinite), float(self.step + 1), limit))

    @torch.no_grad()
    def _observe(self, observed: list, skip: torch.Tensor) -> None:
        """Every rank's per-sample (t, unweighted MSE) of this step, in rank order, to the adaptive
        strategy (one all-gather on the device), so that its statistics and tables are the same on
        every rank; the losses of a skipped step are left out."""
        pairs = torch.stack([torch.cat([t for t, _ in observed]).double(),
                             torch.cat([m for _, m in observed]).double()])  # (2, grad_accum * B), exact
        if self.world > 1:
            parts = [torch.empty_like(pairs) for _ in range(self.world)]
            dist.all_gather(parts, pairs)
            pairs = torch.cat(parts, dim=1)  # (2, world * grad_accum * B)
        loss = pairs[1].float()
        self.fused.observe(pairs[0].long(), loss, ~skip & torch.isfinite(loss))

    def record(self, sums: dict | None = None) -> dict:
        """The log record of the steps since the last record (one device-to-host read unless `sums`,
        a `log_stats.read()` of this moment, is given), and a new window from here on."""
        sums = self.log_stats.read() if sums is None else sums
        steps = self.step - self.window_start
        skipped = int(sums["skipped"])
        out = {
            "step": self.step,
            **window_record(sums, steps - skipped),
            "lr": self.lr_at(self.step - 1),
            "nonfinite": skipped > 0,
            "skipped_steps": int(sums["skipped_steps"]),
        }
        if self.plan.strategy.step_dependent:
            # e.g. CLTS's mix: P(t) follows the optimizer step (the noise is keyed by the micro-step).
            out["strategy_probs_key"] = self.plan.strategy.probs_key(self.step - 1)
        self.log_stats.zero_(WINDOW_FIELDS)
        self.window_start = self.step
        return out

    def _grad_norm(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None

    # ---- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict:
        log = self.log_stats.read()
        return {
            "step": self.step,
            "micro_step": self.micro_step,
            "skipped_steps": int(log["skipped_steps"]),
            "nonfinite_streak": int(log["nonfinite_streak"]),
            "loader": self.loader.state_dict() if self.loader is not None else self._loader_state,
            "world_size": self.world,
            "samples_seen": self.step * self.cfg.global_batch,
            "strategy": self.plan.strategy.describe(),
            # The open log window, so that a resumed run writes the same records for any --log-every.
            "log_window": {"start": self.window_start, **{k: log[k] for k in WINDOW_FIELDS}},
        }

    def save(self) -> str:
        model_sd = self.ema.full_master_state_dict()
        ema_sd = self.ema.full_state_dict()
        extra = {ckpt.SAMPLER_FILE: self.fused.state_dict()} if self.fused.adaptive is not None else {}
        path = ckpt.save(self.engine, self.ckpt_root, self.step, self.state(), model_sd, ema_sd, self.rank,
                         barrier=dist.barrier, keep=self.cfg.keep_ckpts, extra=extra)
        self.last_ckpt = path
        return path

    def _resume(self, path: str) -> None:
        """Restore a checkpoint (its world size was checked against this job's by `main`)."""
        state = ckpt.load(self.engine, path, self.rank)
        self.ema.refresh()
        self.ema.load_full_state_dict(ckpt.load_ema(path))
        self.step = state["step"]
        self.micro_step = state["micro_step"]
        window = dict(state.get("log_window") or {"start": self.step})
        self.window_start = window.pop("start")
        self.log_stats.load({**window, "skipped_steps": state["skipped_steps"],
                             "nonfinite_streak": state["nonfinite_streak"], "limit_step": -1})
        self.ema.num_updates = self.step - state["skipped_steps"]  # one EMA update per applied step
        if self.fused.adaptive is not None:  # the statistics and the tables in force at this step
            self.fused.load_state_dict(ckpt.load_extra(path, ckpt.SAMPLER_FILE))
        self._loader_state = state["loader"]
        self.last_ckpt = path

    # ---- the loop -----------------------------------------------------------------------------

    def _stop_agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (SIGTERM/SIGINT or the launcher's death,
        see `preemption`): the step in flight has finished, all ranks save and exit 0 (collective, on the CPU)."""
        if self.world == 1:
            return preemption.requested() != 0
        flag = torch.tensor([int(preemption.requested() != 0)], dtype=torch.int32)  # a CPU tensor: no device wait
        dist.all_reduce(flag, group=self.cpu_group)
        return flag.tolist()[0] > 0

    def _raise_nonfinite(self, limit_step: int) -> None:
        noticed = "" if limit_step == self.step else f" (noticed at step {self.step})"
        raise NonFiniteLossError(
            f"stopping at step {limit_step}{noticed}: {self.cfg.max_nonfinite} consecutive steps with a non-finite "
            f"loss (--max-nonfinite {self.cfg.max_nonfinite}); no update was applied for them. Last good "
            f"checkpoint: {self.last_ckpt or 'none (no checkpoint was written yet)'}")

    def fit(self) -> int:
        """Train to max_steps (or until preempted); returns the process exit code."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            ckpt.remove_stale(self.ckpt_root)
            artefacts.write_config(self.run_dir, self.plan, self.fused.backend, self._num_params())
        dist.barrier()
        logger = MetricsLogger(self.run_dir, resume_step=self.step) if self.is_main else None
        evaluator = artefacts.make_evaluator(self.plan, self.rank, self.device, self.torch_threads) \
            if cfg.eval_every else None
        preemption.install()  # no-op when main installed it before the engine was built
        self.make_loader()
        batches = self.batches()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.is_main and cfg.progress),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        start = timed_from = time.perf_counter()
        timed_steps = 0  # steps since timed_from: the throughput of the next record
        stopped = False
        try:
            while self.step < cfg.max_steps:
                self.train_step(batches)
                timed_steps += 1
                stopped = self._stop_agreed()
                bar.update(1)
                evaluated = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                # An evaluated step is always logged, whatever --log-every says, so no quality point is lost.
                logged = evaluated or self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                saved = stopped or self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps
                if not (logged or saved):
                    continue
                sums = self.log_stats.read()  # the one device-to-host read of these steps
                rec = None
                if logged:
                    now = time.perf_counter()
                    rec = self.record(sums)
                    rec.update(samples_per_s=cfg.global_batch * timed_steps / (now - timed_from),
                               step_s=(now - timed_from) / timed_steps, epoch=self.loader.epoch,
                               elapsed_s=now - start)
                    bar.set_postfix(loss="nan" if rec["loss"] is None else f"{rec['loss']:.4f}",
                                    img_s=f"{rec['samples_per_s']:.0f}", skipped=rec["skipped_steps"],
                                    refresh=False)
                if sums["limit_step"] >= 0:
                    if rec is not None and logger is not None:
                        logger.log(rec)
                    self._raise_nonfinite(int(sums["limit_step"]))
                if evaluated:  # collective: every rank samples its share of the set
                    model = artefacts.ema_model(self.plan, self.ema, self.rank, self.device, everywhere=True)
                    result = evaluator.evaluate(model, self.step)
                    if result is not None:
                        rec.update({k: v for k, v in result.items() if k != "step"})
                    del model
                    if cfg.eval_online:  # the raw (non-EMA) weights through the same evaluator
                        model = artefacts.ema_model(self.plan, self.ema, self.rank, self.device, everywhere=True,
                                                    online=True)
                        result = evaluator.evaluate(model, self.step)
                        if result is not None:
                            rec.update({f"online_{k}": v for k, v in result.items() if k != "step"})
                        del model
                if rec is not None and logger is not None:
                    logger.log(rec)
                if saved:
                    self.save()
                if stopped:
                    break
                if rec is not None:
                    timed_from, timed_steps = time.perf_counter(), 0
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if stopped:
            if self.is_main:
                print(f"[speed_fast] stopped ({preemption.reason()}) at step {self.step}; checkpoint "
                      f"{self.last_ckpt}. Run the same command again to resume.", file=sys.stderr, flush=True)
            return 0
        if self.last_ckpt is None or ckpt.read_state(self.last_ckpt)["step"] != self.step:
            self.save()
        self.finish()
        return 0

    def _num_params(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    def finish(self) -> None:
        """End of run: the EMA sample grid and the plots on rank 0 (the EMA gather is collective)."""
        model = artefacts.ema_model(self.plan, self.ema, self.rank, self.device)
        if not self.is_main:
            return
        grid, plot, *quality = artefacts.finish(self.plan, self.run_dir, model, self.device)
        quality = f"; quality plot {quality[0]}" if quality else ""
        print(f"[speed_fast] done: {self.step} steps; samples {grid}; loss plot {plot}{quality}; "
              f"checkpoint {self.last_ckpt}", file=sys.stderr, flush=True)
