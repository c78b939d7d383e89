"""Run configuration of the trainer, one job per module:

    schema.py          TrainConfig (every field that defines a run), ConfigError, value types
    presets.py         train/configs/<name>.json -> TrainConfig
    cli.py             the command line: flags over a preset (parse_args, build_parser)
    checks.py          each run-wide value's range, checked once (seed, steps, batches, rates, ...)
    deepspeed_json.py  the DeepSpeed JSON, "auto" entries filled from the run and checked
    resolve.py         resolve(cfg, world_size, ...) -> Plan: every check that can fail, on every rank

    cfg, _ = parse_args(argv, configs_dir)     # preset JSON (train/configs/<name>.json) + flags
    plan = resolve(cfg, world_size, configs_dir, cuda_available)   # before any collective
"""

from .checks import check_batches, check_values
from .cli import build_parser, parse_args
from .deepspeed_json import deepspeed_config
from .presets import DEFAULT_PRESET, load_preset, preset_names
from .resolve import Plan, resolve
from .schema import PRECISIONS, RESUME_MODES, ZERO_STAGES, ConfigError, TrainConfig, check_types

__all__ = ["DEFAULT_PRESET", "PRECISIONS", "RESUME_MODES", "ZERO_STAGES", "ConfigError", "Plan", "TrainConfig",
           "build_parser", "check_batches", "check_types", "check_values", "deepspeed_config", "load_preset",
           "parse_args", "preset_names", "resolve"]
