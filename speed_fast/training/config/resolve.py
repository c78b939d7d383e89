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
    model: object                        # the model's config: DiTConfig, UNetConfig, DiTT2IConfig (speed_fast.models)
    schedule: NoiseSchedule
    strategy: object
    ds_config: dict
    use_cuda: bool
    precision: str
    compile: bool = False
    loader: str = "ffcv"                 # the resolved loader: "ffcv" or "memmap"
    loader_note: str | None = None       # why "auto" chose memmap (said once, by rank 0)
    caption_dropout: float = 0.0         # text-to-image models: P(a caption is replaced by the null caption)


def resolve(cfg: TrainConfig, world_size: int, configs_dir: str, cuda_available: bool) -> Plan:
    """Validate `cfg` for a job of `world_size` ranks and derive the plan; raises ConfigError."""
    from ...data import ensure_captioned_digits, ensure_digits_beton, read_latent_meta
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
    elif cfg.data == "digits-t2i":
        data_path = ensure_captioned_digits()
    else:
        data_path = os.path.realpath(cfg.data)  # what a resume compares, wherever it is started from
        if not os.path.isfile(data_path):
            raise ConfigError(f"--data {cfg.data!r}: no such file (expected an FFCV .beton of latents written "
                              f"by speed_fast.data.write_latents, 'digits' or 'digits-t2i')")
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

    # Model: a registry name + the run's settings for its family (`dit`, `unet` or `t2i`); the data fixes
    # input size, channels and classes (a text-to-image model: the caption embeddings' width).
    C, H, W = meta["shape"]
    if H != W:
        raise ConfigError(f"--data {data_path}: latents are {H}x{W}; the models need square inputs")
    try:
        family = family_of(cfg.model)
    except ValueError:
        raise ConfigError(f"--model must be one of {model_names()}, got {cfg.model!r}") from None
    settings = getattr(cfg, family)
    check_types(config_class(family), settings, family)
    fixed = dict(input_size=H, in_channels=C, grad_checkpointing=cfg.grad_checkpointing)
    fixed.update(_conditioning(cfg, family, settings, data_path, meta))
    if family in ("dit", "t2i"):
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
        kind = "a U-Net" if family == "unet" else "a text-to-image DiT"
        raise ConfigError(f"--init-from reads facebookresearch/DiT checkpoints; --model {cfg.model} is {kind}")
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
                loader_note=loader_note, caption_dropout=_caption_dropout(cfg, family))


def _caption_dropout(cfg: TrainConfig, family: str) -> float:
    """P(a caption is replaced by the null caption): --caption-dropout, 0.1 by default, for text models only."""
    if family != "t2i":
        return 0.0
    return 0.1 if cfg.caption_dropout is None else float(cfg.caption_dropout)


T2I_NAMES = "dit-t2i-s2, dit-t2i-xl2 or dit-t2i-custom"


def _conditioning(cfg: TrainConfig, family: str, settings: dict, data_path: str, meta: dict) -> dict:
    """What the data fixes of the model's conditioning: the classes, or a text model's text_width (the
    width of the file's caption embeddings). A text model needs captioned data, a class-conditional one
    uncaptioned data (it would ignore the captions), and --caption-dropout belongs to text models."""
    text = meta.get("text")
    if family != "t2i":
        if text is not None:
            raise ConfigError(f"--data {data_path} is captioned (text [{text['tokens']}, {text['width']}] from "
                              f"{text['encoder']!r}) but --model {cfg.model} is class-conditional and would ignore "
                              f"the captions; use a text-to-image model ({T2I_NAMES}) or an uncaptioned file")
        if cfg.caption_dropout is not None:
            raise ConfigError(f"--caption-dropout {cfg.caption_dropout} applies to text-to-image models; --model "
                              f"{cfg.model} is class-conditional (its label dropout is the {family} setting "
                              "class_dropout_prob)")
        return {"num_classes": int(meta["num_classes"])}
    if text is None:
        raise ConfigError(f"--model {cfg.model} is a text-to-image model but --data {data_path} has no captions; "
                          "expected a captioned .beton (`speed-fast encode --captions FILE --text-encoder NAME`, or "
                          "'digits-t2i')")
    width = int(text["width"])
    if settings.get("text_width", width) != width:
        raise ConfigError(f"--data {data_path}: its captions are embeddings of width {width} (text encoder "
                          f"{text['encoder']!r}), but the model's text_width is {settings['text_width']} (t2i "
                          "settings); use data encoded by a text encoder of that width, or drop text_width")
    if cfg.eval_every and cfg.eval_samples > meta["num_samples"]:
        raise ConfigError(f"--eval-samples {cfg.eval_samples}: a text model's evaluation samples the captions of "
                          f"as many records, --data {data_path} has {meta['num_samples']}")
    return {"text_width": width}
