"""The DeepSpeed JSON of a run: train/configs/deepspeed/zero<stage>.json (or --deepspeed_config) with
its "auto" entries filled from the run and every explicit value checked against it."""

from __future__ import annotations

import os

from ...jsonfile import JSONFileError, read_json_object
from .schema import ZERO_STAGES, ConfigError, TrainConfig


def deepspeed_config(cfg: TrainConfig, configs_dir: str, world_size: int, micro: int, accum: int,
                     precision: str) -> dict:
    """The DeepSpeed JSON with "auto" entries filled from the run config, checked against it."""
    path = cfg.deepspeed_config or os.path.join(configs_dir, "deepspeed", f"zero{cfg.zero_stage}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path!r}: no such file")
    try:
        ds = read_json_object(path)
    except JSONFileError as exc:
        raise ConfigError(f"DeepSpeed config {exc}") from None
    want = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise ConfigError(f"DeepSpeed config {path}: {key} = {have!r} but this run needs {value!r} "
                              f"(set it to \"auto\" to take the run's value)")
    for key in ("zero_optimization", "bf16", "fp16", "torch_autocast", "checkpoint", "datastates"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"DeepSpeed config {path}: {key!r} must be a JSON object (e.g. {{\"enabled\": true}}), "
                              f"got {ds[key]!r}")
    for key in ("optimizer", "scheduler", "fp16"):
        if ds.get(key) and (key != "fp16" or ds[key].get("enabled")):
            raise ConfigError(f"DeepSpeed config {path}: {key!r} is set by the trainer (AdamW lr/weight decay "
                              f"flags, bf16/fp32 precision); remove it from the JSON")
    # Checkpoints are the trainer's: written by DeepSpeed's torch engine, read back only through
    # speed_fast.training.checkpoint's safe loader (other engines and universal checkpoints load unsafely).
    ckpt_cfg, datastates = ds.get("checkpoint", {}), ds.get("datastates", {})
    if ckpt_cfg.get("writer") or ckpt_cfg.get("load_universal") or datastates.get("enabled"):
        raise ConfigError(f"DeepSpeed config {path}: checkpoint writers, universal checkpoints and datastates "
                          "are not supported (the trainer writes and verifies its own checkpoints); remove them")
    # Precision policy (README "Running on GPUs"): the weights, gradients, their accumulation and
    # the optimizer stay fp32 and the forward runs under bf16 autocast (DeepSpeed's torch_autocast),
    # so matmuls are bf16 while the residual stream stays fp32. DeepSpeed's own bf16 mode would cast
    # the whole model, residual stream included, and is refused.
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") not in ("auto", False):
        raise ConfigError(f"DeepSpeed config {path}: bf16.enabled = {bf16['enabled']!r}; the trainer keeps fp32 "
                          f"weights and runs bf16 under autocast (--precision bf16), which needs DeepSpeed's "
                          f"bf16 mode off: set it to \"auto\" or false")
    bf16["enabled"] = False
    autocast = ds.setdefault("torch_autocast", {})
    if autocast.get("enabled", "auto") not in ("auto", True, False):
        raise ConfigError(f"DeepSpeed config {path}: torch_autocast.enabled must be true, false or \"auto\", "
                          f"got {autocast['enabled']!r}")
    if autocast.get("enabled", "auto") == "auto":
        autocast["enabled"] = precision == "bf16"
    elif bool(autocast["enabled"]) != (precision == "bf16"):
        raise ConfigError(f"DeepSpeed config {path}: torch_autocast.enabled = {autocast['enabled']!r} but "
                          f"precision is {precision!r}")
    if autocast["enabled"]:
        autocast.setdefault("dtype", "bfloat16")
        # No module's gradients are communicated in bf16 unless the JSON lists them: fp32 all the way.
        autocast.setdefault("lower_precision_safe_modules", [])
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", cfg.zero_stage)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be one of {ZERO_STAGES}, "
                          f"got {stage!r}")
    if stage != cfg.zero_stage:  # what runs is what config.json records and resume compares
        raise ConfigError(f"{path}: zero_optimization.stage = {stage} but --zero-stage is {cfg.zero_stage}; "
                          "pass the same stage to both (or leave the stage out of the JSON)")
    # The trainer's AdamW (a torch optimizer) is what ZeRO partitions; silence DeepSpeed's step printouts.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
