"""The run-wide values' checks: each value once, where the run is resolved, with its whole range.

Every message names the flag, the range and the value (`ConfigError`, exit 2 in train/main.py).
The ranges include the limits of what consumes the value later, so nothing run-wide can fail
after the engine is built: the seed keys the counter RNG (< 2^64, speed_fast.rng) and the
micro-step is its step word (max_steps x accumulation <= 2^32).
"""

from __future__ import annotations

import dataclasses
import math

from ...data.choose import LOADERS
from ...rng import SEED_LIMIT, STEP_LIMIT
from .schema import PRECISIONS, RESUME_MODES, ZERO_STAGES, ConfigError, TrainConfig, check_types

_POWERS = {SEED_LIMIT: "2^64", STEP_LIMIT: "2^32"}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def int_in(name: str, value, lo: int, hi: int | None = None, hi_open: bool = False) -> int:
    """An int (not a bool) in [lo, hi] (or [lo, hi) with hi_open; no upper bound when hi is None)."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= lo
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        if hi is None:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
        raise ConfigError(f"{name} must be an integer in [{lo}, {_POWERS.get(hi, hi)}{')' if hi_open else ']'}, "
                          f"got {value!r}")
    return value


def real_in(name: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_num_workers(n: int) -> None:
    """The loader's worker threads come from numba's pool (NUMBA_NUM_THREADS, default: the CPU count)."""
    import numba

    if n > numba.config.NUMBA_NUM_THREADS:
        raise ConfigError(f"--num-workers must be <= {numba.config.NUMBA_NUM_THREADS} (numba's thread pool, "
                          f"NUMBA_NUM_THREADS), got {n}")


def check_values(cfg: TrainConfig) -> None:
    """Types and ranges of every scalar field (those that need no data, world size or schedule)."""
    check_types(TrainConfig, dataclasses.asdict(cfg), "config")
    for name in ("global_batch", "max_steps", "log_every", "ckpt_every", "keep_ckpts", "max_nonfinite",
                 "num_workers", "eval_samples"):
        int_in(_flag(name), getattr(cfg, name), 1)
    int_in("--seed", cfg.seed, 0, SEED_LIMIT, hi_open=True)
    for name in ("warmup_steps", "eval_every"):
        int_in(_flag(name), getattr(cfg, name), 0)
    for name in ("ema_warmup", "eval_online"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.eval_clip is not None and not isinstance(cfg.eval_clip, bool):
        raise ConfigError(f"eval_clip must be true, false or null (auto: clip on pixel data), got {cfg.eval_clip!r}")
    if cfg.compile not in (None, True, False):
        raise ConfigError(f"compile must be true, false or null (auto: on with CUDA), got {cfg.compile!r}")
    real_in("--lr", cfg.lr, 0.0, 1.0, lo_open=True)
    real_in("--weight-decay", cfg.weight_decay, 0.0, 1.0)
    real_in("--ema-decay", cfg.ema_decay, 0.0, 1.0, hi_open=True)
    real_in("--grad-clip", cfg.grad_clip, 0.0, math.inf, hi_open=True)
    real_in("--sample-cfg", cfg.sample_cfg, 0.0, math.inf, hi_open=True)
    if cfg.caption_dropout is not None:
        real_in("--caption-dropout", cfg.caption_dropout, 0.0, 1.0, hi_open=True)
    if len(cfg.adam_betas) != 2:
        raise ConfigError(f"adam_betas must be two numbers, got {cfg.adam_betas!r}")
    for i, b in enumerate(cfg.adam_betas):
        real_in(f"adam_betas[{i}]", b, 0.0, 1.0, hi_open=True)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"--zero-stage must be one of {ZERO_STAGES}, got {cfg.zero_stage!r}")
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"--resume must be auto, must or never, got {cfg.resume!r}")
    if cfg.eval_every and cfg.eval_samples < 2:
        raise ConfigError(f"--eval-samples must be >= 2 (a Frechet distance needs a covariance), "
                          f"got {cfg.eval_samples}")
    if cfg.loader not in LOADERS:
        raise ConfigError(f"--loader must be one of {list(LOADERS)}, got {cfg.loader!r}")


def check_loader(cfg: TrainConfig) -> tuple[str, str | None]:
    """(the loader that reads the data: "ffcv" or "memmap", the line saying why "auto" chose the
    memory map, or None); --num-workers is bounded by numba's pool only for FFCV's pipeline."""
    from ...data import resolve_loader

    try:
        loader, note = resolve_loader(cfg.loader)
    except ValueError as exc:
        raise ConfigError(f"--loader: {exc}") from None
    if loader == "ffcv":
        check_num_workers(cfg.num_workers)
    return loader, note


def check_batches(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch, accumulation) with global = world x micro x accumulation, and the values that
    depend on them: the micro-steps a run takes (the RNG's step word) and the evaluation set's split."""
    if cfg.micro_batch is None:
        if cfg.global_batch % world_size:
            raise ConfigError(f"--global-batch {cfg.global_batch} is not divisible by the world size {world_size}")
        micro, accum = cfg.global_batch // world_size, 1
    else:
        micro = int_in("--micro-batch", cfg.micro_batch, 1)
        if cfg.global_batch % (world_size * micro):
            raise ConfigError(f"--global-batch {cfg.global_batch} is not divisible by world size x micro batch "
                              f"= {world_size} x {micro} = {world_size * micro}")
        accum = cfg.global_batch // (world_size * micro)
    if cfg.max_steps * accum > STEP_LIMIT:  # micro-step m = step x accum + i keys the noise, m < 2^32
        raise ConfigError(f"--max-steps must be an integer in [1, {STEP_LIMIT // accum}] (2^32 micro-steps at "
                          f"{accum} per step key the noise), got {cfg.max_steps}")
    if cfg.eval_every and cfg.eval_samples < world_size:
        raise ConfigError(f"--eval-samples must be >= the world size {world_size} (every rank samples a share), "
                          f"got {cfg.eval_samples}")
    return micro, accum
