"""`resolve`: a configuration for a job of N ranks -> the validated `Plan` (every check that can fail).

`resolve` runs identically in every rank before the process group exists, so a bad value
(unknown strategy, k < 1, a global batch that does not split into world size x micro batch
x accumulation, a missing or damaged data file, a broken DeepSpeed JSON, a sampler spec, a
preset value of the wrong type, a seed beyond 2^64, ...) stops every rank with the same message
before any training time is spent, instead of leaving some of them waiting in a collective or
failing at the end of the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...models.registry import config_class, family_of, model_config, model_names
from ...ops import resolve_backend
from ...schedule import NoiseSchedule
from ...timesteps import STRATEGIES, make_strategy
from .checks import check_batches, check_loader, check_values, int_in
from .deepspeed_json import deepspeed_config
from .schema import ConfigError, TrainConfig, check_types


@dataclass
class Plan:
    """A validated configuration with everything derived from it (identical on every rank)."""

    cfg: TrainConfig
    world_size: int
    micro_batch: int
    grad_accum: int
    data_path: str
    data_meta: dict
    model: object                        # the model's config: a DiTConfig or a UNetConfig (speed_fast.models)
    schedule: NoiseSchedule
    strategy: object
    ds_config: dict
    use_cuda: bool
    precision: str
    compile: bool = False
    loader: str = "ffcv"                 # the resolved loader: "ffcv" or "memmap"
    loader_note: str | None = None       # why "auto" chose memmap (said once, by rank 0)


def resolve(cfg: TrainConfig, world_size: int, configs_dir: str, cuda_available: bool) -> Plan:
    """Validate `cfg` for a job of `world_size` ranks and derive the plan; raises ConfigError."""
    from ...data import ensure_digits_beton, read_latent_meta
    from ...data.latents import check_crc, fingerprint
    from ...sampling import space_timesteps
    from ...theory import area_index

    world_size = int_in("world size (WORLD_SIZE)", world_size, 1)
    check_values(cfg)
    micro, accum = check_batches(cfg, world_size)
    loader, loader_note = check_loader(cfg)
    # bf16 = fp32 weights under bf16 autocast (see deepspeed_json); it also runs on CPU, where
    # "auto" stays fp32 (faster there and exact to resume).
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda_available else "fp32")

    # Schedule and strategy (their constructors name the bad parameter and its range).
    try:
        schedule = NoiseSchedule.make(**cfg.schedule)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"schedule {cfg.schedule}: {exc}") from None
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    try:
        strategy = make_strategy(cfg.strategy, schedule, **cfg.strategy_params)
    except ValueError as exc:
        raise ConfigError(f"--strategy {cfg.strategy}: {exc}") from None
    try:
        area_index(schedule, strategy.area_tau())  # the per-area loss split the trainer logs
    except ValueError as exc:
        raise ConfigError(f"schedule {cfg.schedule} with --strategy {cfg.strategy}: {exc}") from None
    for flag, spec in (("--sample-steps", cfg.sample_steps), ("--eval-sampler", cfg.eval_sampler)):
        try:
            space_timesteps(schedule.T, spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{flag} {spec!r}: {exc}") from None

    # Data: the file must exist and be a valid latent file before any rank starts waiting on others.
    if cfg.data == "digits":
        data_path = ensure_digits_beton()
    else:
        data_path = os.path.realpath(cfg.data)  # what a resume compares, wherever it is started from
        if not os.path.isfile(data_path):
            raise ConfigError(f"--data {cfg.data!r}: no such file (expected an FFCV .beton of latents written "
                              f"by speed_fast.data.write_latents, or 'digits')")
    try:
        meta = read_latent_meta(data_path)
        check_crc(data_path, meta, force=cfg.verify_data)
        meta = {**meta, "fingerprint": fingerprint(data_path, meta)}
    except ValueError as exc:
        raise ConfigError(f"--data: {exc}") from None
    per_rank = (meta["num_samples"] // (world_size * micro)) * micro
    if per_rank == 0:
        raise ConfigError(f"--data {data_path}: {meta['num_samples']} samples cannot fill one micro batch of "
                          f"{micro} on each of {world_size} ranks")

    # Model: a registry name + the run's settings for its family (`dit` or `unet`); the data fixes
    # input size, channels and classes.
    C, H, W = meta["shape"]
    if H != W:
        raise ConfigError(f"--data {data_path}: latents are {H}x{W}; the models need square inputs")
    try:
        family = family_of(cfg.model)
    except ValueError:
        raise ConfigError(f"--model must be one of {model_names()}, got {cfg.model!r}") from None
    settings = cfg.dit if family == "dit" else cfg.unet
    check_types(config_class(family), settings, family)
    fixed = dict(input_size=H, in_channels=C, num_classes=int(meta["num_classes"]),
                 grad_checkpointing=cfg.grad_checkpointing)
    if family == "dit":
        fixed["attn_backend"] = cfg.attn_backend
    elif cfg.attn_backend == "xformers":
        raise ConfigError(f"--attn-backend xformers applies to DiT models; --model {cfg.model} is a U-Net, whose "
                          "attention runs diffusers' SDPA processor (use auto or sdpa)")
    try:
        model = model_config(cfg.model, settings, **fixed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--model {cfg.model} on {C}x{H}x{W} data ({family} settings {settings}): {exc}") from None

    try:
        resolve_backend(cfg.backend, "cuda" if cuda_available else "cpu")
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--backend {cfg.backend!r}: {exc}") from None

    if cfg.init_from is not None and family != "dit":
        raise ConfigError(f"--init-from reads facebookresearch/DiT checkpoints; --model {cfg.model} is a U-Net")
    if cfg.init_from is not None and not os.path.isfile(cfg.init_from):
        raise ConfigError(f"--init-from {cfg.init_from!r}: no such file (expected a facebookresearch/DiT "
                          f"checkpoint such as DiT-XL-2-256x256.pt)")
    if cfg.init_from is not None:
        from ...models.interop import read_dit_checkpoint

        try:  # before the run directory exists: a bad file leaves nothing behind
            read_dit_checkpoint(cfg.init_from, model)
        except ValueError as exc:
            raise ConfigError(f"--init-from {exc}") from None
    ds = deepspeed_config(cfg, configs_dir, world_size, micro, accum, precision)
    return Plan(cfg=cfg, world_size=world_size, micro_batch=micro, grad_accum=accum, data_path=data_path,
                data_meta=meta, model=model, schedule=schedule, strategy=strategy, ds_config=ds,
                use_cuda=cuda_available, precision=precision,
                compile=cuda_available if cfg.compile is None else cfg.compile, loader=loader,
                loader_note=loader_note)
