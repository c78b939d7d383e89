"""Run configuration of the trainer: one dataclass, presets, the command line, and validation.

    cfg = parse_args(argv, configs_dir)        # preset JSON (train/configs/<name>.json) + flags
    plan = resolve(cfg, world_size)            # every check that can fail, before any collective

`resolve` runs identically in every rank before the process group exists, so a bad value
(unknown strategy, k < 1, a global batch that does not split into world size x micro batch
x accumulation, a missing or damaged data file, a broken DeepSpeed JSON, a sampler spec, a
preset value of the wrong type, ...) stops every rank with the same message before any
training time is spent, instead of leaving some of them waiting in a collective or failing
at the end of the run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from ..models.dit import DiTConfig
from ..ops import resolve_backend
from ..schedule import NoiseSchedule
from ..timesteps import STRATEGIES, STRATEGY_PARAMS, make_strategy

PRECISIONS = ("auto", "fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
DEFAULT_PRESET = "digits"


class ConfigError(ValueError):
    """A run configuration that cannot train; the message names the value and what was expected."""


@dataclass
class TrainConfig:
    """Everything that defines a run (written to <run_dir>/config.json). Defaults are the DiT
    paper's ImageNet recipe; presets (train/configs/*.json) override them."""

    preset: str = "custom"
    # model: a DiT family name ("DiT-XL/2") or "custom"; `dit` overrides DiTConfig fields.
    model: str = "DiT-XL/2"
    dit: dict = field(default_factory=dict)
    # data: an FFCV .beton of latents (speed_fast.data), or "digits" for the embedded default.
    data: str = "digits"
    flip: bool = False                   # random horizontal flips (DiT flips ImageNet)
    schedule: dict = field(default_factory=lambda: {"kind": "linear", "T": 1000, "beta_start": 1e-4,
                                                    "beta_end": 0.02})
    strategy: str = "speed"
    strategy_params: dict = field(default_factory=dict)
    global_batch: int = 256
    micro_batch: int | None = None       # per rank; default: global_batch / world_size (no accumulation)
    max_steps: int = 400_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 0.0               # 0: no clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = False             # decay min(d, (1 + n) / (10 + n)) at the n-th update (short runs)
    zero_stage: int = 1
    deepspeed_config: str | None = None  # a DeepSpeed JSON; default train/configs/deepspeed/zero<stage>.json
    precision: str = "auto"              # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 5000
    keep_ckpts: int = 2
    eval_every: int = 0                  # 0: no training-time evaluation
    eval_samples: int = 256
    eval_sampler: str = "ddim25"         # respacing; "ddimN" samples with DDIM, "N" with DDPM (learned sigma)
    eval_clip: bool | None = None        # clip predicted x0 to [-1, 1]; None: on pixel data only
    eval_online: bool = False            # also evaluate the raw (non-EMA) weights, logged as online_<key>
    sample_steps: str = "250"            # end-of-run sample grid (DDPM, respaced)
    sample_cfg: float = 1.0
    max_nonfinite: int = 5               # consecutive non-finite steps before the run stops
    verify_data: bool = False            # CRC the whole --data file even when this version was verified before
    num_workers: int = 2
    loader: str = "auto"                 # auto | ffcv | memmap (the same batches; auto: FFCV when it imports)
    grad_checkpointing: bool = False
    compile: bool | None = None          # None: torch.compile the model on CUDA, eager on CPU
    init_from: str | None = None         # a facebookresearch/DiT checkpoint to start from (fine-tuning)
    backend: str = "auto"                # fused SpeeD ops: auto | torch | cpp | triton
    attn_backend: str = "auto"
    run_dir: str | None = None           # default runs/<preset>-<strategy>-seed<seed>
    resume: str = "auto"                 # auto: resume when run_dir has a checkpoint; "must"; "never"
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
        check_types(cls, d, where)
        cfg = cls(**copy.deepcopy(d))
        cfg.adam_betas = tuple(cfg.adam_betas)
        return cfg


# Annotation of a config field -> the JSON/Python types its value may have.
_ANNOTATION_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
                     "tuple": (list, tuple), "int | None": (int, type(None)), "str | None": (str, type(None))}


def check_types(cls, values: dict, where: str) -> None:
    """Each value in `values` has the type of the dataclass field of that name (bools are not
    numbers here); raises ConfigError naming the key, the value and the expected type."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        allowed = _ANNOTATION_TYPES.get(fields.get(key))
        if allowed is None:
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise ConfigError(f"{where}: {key} must be {fields[key]}, got {value!r} ({type(value).__name__})")


def preset_names(configs_dir: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".json"))


def load_preset(name: str, configs_dir: str) -> TrainConfig:
    """The TrainConfig of train/configs/<name>.json (or of a JSON file path)."""
    path = name if name.endswith(".json") else os.path.join(configs_dir, f"{name}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--preset {name!r}: no such preset; available: {preset_names(configs_dir)} "
                          f"(or a path to a JSON file)")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"preset {path} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"preset {path} must hold a JSON object, got {type(d).__name__}")
    d.setdefault("preset", os.path.basename(path)[:-5])
    return TrainConfig.from_dict(d, where=f"preset {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepspeed train/main.py",
        description="Train a DiT with SpeeD under DeepSpeed. With no arguments: the 'digits' preset "
                    "(scikit-learn's 8x8 digits, a small DiT, SpeeD) to completion, CPU included.")
    S = argparse.SUPPRESS
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=DEFAULT_PRESET, help="preset name in train/configs or a JSON path "
                   "(default: digits)")
    g.add_argument("--run-dir", default=S, help="run directory (default runs/<preset>-<strategy>-seed<seed>)")
    g.add_argument("--resume", nargs="?", const="must", default=S, choices=("auto", "must", "never"),
                   help="resume from the run dir's latest complete checkpoint: 'auto' (default) when there "
                        "is one, 'must' (bare --resume) fails without one, 'never' starts over")
    g.add_argument("--max-steps", type=int, default=S)
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--log-every", type=int, default=S)
    g.add_argument("--ckpt-every", type=int, default=S)
    g.add_argument("--keep-ckpts", type=int, default=S)
    g.add_argument("--eval-every", type=int, default=S, help="evaluate (Frechet distance of EMA samples) every "
                   "N steps on rank 0; 0 disables")
    g.add_argument("--eval-samples", type=int, default=S)
    g.add_argument("--eval-sampler", default=S, help="respacing of the evaluation sampler: ddimN (DDIM) or N "
                   "(DDPM with the learned sigma); default ddim25")
    g.add_argument("--eval-clip", action=argparse.BooleanOptionalAction, default=S,
                   help="clip the predicted x0 to [-1, 1] while sampling for evaluation (default: on for "
                        "pixel data, off for latents)")
    g.add_argument("--eval-online", action=argparse.BooleanOptionalAction, default=S,
                   help="also evaluate the raw (non-EMA) weights, logged as online_<metric>")
    g.add_argument("--sample-steps", default=S, help="respacing of the end-of-run DDPM sample grid, e.g. 250")
    g.add_argument("--sample-cfg", type=float, default=S, help="classifier-free guidance scale of the grid")
    g.add_argument("--max-nonfinite", type=int, default=S, help="stop after this many non-finite steps in a row")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=S, help="DiT-{S,B,L,XL}/{2,4,8} or 'custom' (preset's dit fields)")
    g.add_argument("--data", default=S, help="latent .beton (speed_fast.data), or 'digits'")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=S,
                   help="random horizontal flips of the latents (the ImageNet presets flip)")
    g.add_argument("--grad-checkpointing", action="store_true", default=S)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=S,
                   help="torch.compile the model (default: on with CUDA, off on CPU)")
    g.add_argument("--init-from", default=S, metavar="PATH",
                   help="start from the weights of a facebookresearch/DiT checkpoint (e.g. DiT-XL-2-256x256.pt, "
                        "or `speed-fast export-dit` output); the EMA starts there too")
    g.add_argument("--attn-backend", default=S, choices=("auto", "sdpa", "xformers"))
    g.add_argument("--num-workers", type=int, default=S, help="data loader threads per rank")
    g.add_argument("--loader", default=S, choices=("auto", "ffcv", "memmap"),
                   help="ffcv: FFCV's compiled pipeline; memmap: numpy memory maps (no FFCV needed); the same "
                        "batches either way. auto (default): ffcv when it imports, else memmap")
    g.add_argument("--verify-data", action="store_true", default=S,
                   help="CRC the whole --data file before training even if this version of it was verified "
                        "before (it always is the first time it is used)")
    g = p.add_argument_group("SpeeD / time-step strategy")
    g.add_argument("--strategy", default=S, help=f"one of {STRATEGIES}")
    for name, typ in STRATEGY_PARAMS.items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"strategy.{name}", type=typ, default=S,
                       metavar=name.upper())
    g.add_argument("--dual", dest="strategy.dual", action=argparse.BooleanOptionalAction, default=S,
                   help="SpeeD: mirror half of each batch's draws (the authors' default, on in the presets)")
    g.add_argument("--backend", default=S, help="fused SpeeD ops backend: auto | torch | cpp | triton")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch", type=int, default=S)
    g.add_argument("--micro-batch", type=int, default=S, help="per-rank micro batch (accumulation = global "
                   "/ (world x micro))")
    g.add_argument("--lr", type=float, default=S)
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--warmup-steps", type=int, default=S)
    g.add_argument("--grad-clip", type=float, default=S)
    g.add_argument("--ema-decay", type=float, default=S)
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=S,
                   help="EMA decay min(d, (1 + n) / (10 + n)) at the n-th update (on in short-run presets)")
    g.add_argument("--zero-stage", type=int, default=S, choices=ZERO_STAGES)
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=S,
                   help="DeepSpeed JSON (default train/configs/deepspeed/zero<stage>.json); batch sizes, "
                        "clipping and precision set to \"auto\" there are filled from this run's config")
    g.add_argument("--precision", default=S, choices=PRECISIONS)
    # Set by the deepspeed launcher; LOCAL_RANK from the environment takes precedence.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=S)
    return p


def parse_args(argv: list[str], configs_dir: str) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, raw namespace): the preset with the given flags applied."""
    ns = build_parser().parse_args(argv)
    cfg = load_preset(ns.preset, configs_dir)
    flags = {k: v for k, v in vars(ns).items() if k not in ("preset", "local_rank")}
    strategy_flags = {k.split(".", 1)[1]: v for k, v in flags.items() if k.startswith("strategy.")}
    if "strategy" in flags and flags["strategy"] != cfg.strategy:
        cfg.strategy_params = {}  # the preset's parameters belong to its own strategy
    for key, value in flags.items():
        if not key.startswith("strategy."):
            setattr(cfg, key, value)
    cfg.strategy_params = {**cfg.strategy_params, **strategy_flags}
    if cfg.run_dir is None:
        cfg.run_dir = os.path.join("runs", f"{cfg.preset}-{cfg.strategy}-seed{cfg.seed}")
    return cfg, ns


@dataclass
class Plan:
    """A validated configuration with everything derived from it (identical on every rank)."""

    cfg: TrainConfig
    world_size: int
    micro_batch: int
    grad_accum: int
    data_path: str
    data_meta: dict
    dit: DiTConfig
    schedule: NoiseSchedule
    strategy: object
    ds_config: dict
    use_cuda: bool
    precision: str
    compile: bool = False
    loader: str = "ffcv"                 # the resolved loader: "ffcv" or "memmap"
    loader_note: str | None = None       # why "auto" chose memmap (said once, by rank 0)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _real(name: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _num_workers(n: int) -> None:
    """The loader's worker threads come from numba's pool (NUMBA_NUM_THREADS, default: the CPU count)."""
    import numba

    if n > numba.config.NUMBA_NUM_THREADS:
        raise ConfigError(f"--num-workers must be <= {numba.config.NUMBA_NUM_THREADS} (numba's thread pool, "
                          f"NUMBA_NUM_THREADS), got {n}")


def digits_path() -> str:
    """The embedded dataset's .beton, created once (a file lock keeps concurrent ranks from racing)."""
    import fcntl

    from ..data import ensure_digits_beton
    from ..data.digits import default_cache_dir

    os.makedirs(default_cache_dir(), exist_ok=True)
    with open(os.path.join(default_cache_dir(), "digits.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return ensure_digits_beton()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def deepspeed_config(cfg: TrainConfig, configs_dir: str, world_size: int, micro: int, accum: int,
                     precision: str) -> dict:
    """The DeepSpeed JSON with "auto" entries filled from the run config, checked against it."""
    path = cfg.deepspeed_config or os.path.join(configs_dir, "deepspeed", f"zero{cfg.zero_stage}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path!r}: no such file")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
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


def resolve(cfg: TrainConfig, world_size: int, configs_dir: str, cuda_available: bool) -> Plan:
    """Validate `cfg` for a job of `world_size` ranks and derive the plan; raises ConfigError."""
    from ..data import read_latent_meta
    from ..data.latents import check_crc, fingerprint
    from ..sampling import space_timesteps
    from ..theory import area_index

    check_types(TrainConfig, dataclasses.asdict(cfg), "config")
    world_size = _positive_int("world size (WORLD_SIZE)", world_size)
    for name in ("global_batch", "max_steps", "log_every", "ckpt_every", "keep_ckpts", "max_nonfinite",
                 "num_workers", "eval_samples"):
        _positive_int(f"--{name.replace('_', '-')}", getattr(cfg, name))
    for name in ("seed", "warmup_steps", "eval_every"):
        _positive_int(f"--{name.replace('_', '-')}", getattr(cfg, name), minimum=0)
    for name in ("ema_warmup", "eval_online"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.eval_clip is not None and not isinstance(cfg.eval_clip, bool):
        raise ConfigError(f"eval_clip must be true, false or null (auto: clip on pixel data), got {cfg.eval_clip!r}")
    _real("--lr", cfg.lr, 0.0, 1.0, lo_open=True)
    _real("--weight-decay", cfg.weight_decay, 0.0, 1.0)
    _real("--ema-decay", cfg.ema_decay, 0.0, 1.0, hi_open=True)
    _real("--grad-clip", cfg.grad_clip, 0.0, math.inf, hi_open=True)
    _real("--sample-cfg", cfg.sample_cfg, 0.0, math.inf, hi_open=True)
    if len(cfg.adam_betas) != 2:
        raise ConfigError(f"adam_betas must be two numbers, got {cfg.adam_betas!r}")
    for i, b in enumerate(cfg.adam_betas):
        _real(f"adam_betas[{i}]", b, 0.0, 1.0, hi_open=True)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"--zero-stage must be one of {ZERO_STAGES}, got {cfg.zero_stage!r}")
    if cfg.resume not in ("auto", "must", "never"):
        raise ConfigError(f"--resume must be auto, must or never, got {cfg.resume!r}")
    if cfg.eval_every and cfg.eval_samples < 2:
        raise ConfigError(f"--eval-samples must be >= 2 (a Frechet distance needs a covariance), "
                          f"got {cfg.eval_samples}")
    from ..data import resolve_loader

    try:
        loader, loader_note = resolve_loader(cfg.loader)
    except ValueError as exc:
        raise ConfigError(f"--loader: {exc}") from None
    if loader == "ffcv":
        _num_workers(cfg.num_workers)
    # bf16 = fp32 weights under bf16 autocast (see deepspeed_config); it also runs on CPU, where
    # "auto" stays fp32 (faster there and exact to resume).
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda_available else "fp32")

    # Batch arithmetic: global = world x micro x accumulation.
    if cfg.micro_batch is None:
        if cfg.global_batch % world_size:
            raise ConfigError(f"--global-batch {cfg.global_batch} is not divisible by the world size {world_size}")
        micro, accum = cfg.global_batch // world_size, 1
    else:
        micro = _positive_int("--micro-batch", cfg.micro_batch)
        if cfg.global_batch % (world_size * micro):
            raise ConfigError(f"--global-batch {cfg.global_batch} is not divisible by world size x micro batch "
                              f"= {world_size} x {micro} = {world_size * micro}")
        accum = cfg.global_batch // (world_size * micro)

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
        data_path = digits_path()
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

    # Model: family name + overrides; the data fixes input size, channels and classes.
    C, H, W = meta["shape"]
    if H != W:
        raise ConfigError(f"--data {data_path}: latents are {H}x{W}; DiT needs square inputs")
    check_types(DiTConfig, cfg.dit, "dit")
    try:
        fixed = dict(input_size=H, in_channels=C, num_classes=int(meta["num_classes"]),
                     grad_checkpointing=cfg.grad_checkpointing, attn_backend=cfg.attn_backend)
        overrides = {**cfg.dit, **fixed}
        dit = DiTConfig(**overrides) if cfg.model == "custom" else DiTConfig.named(cfg.model, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--model {cfg.model} with {cfg.dit}: {exc}") from None

    try:
        resolve_backend(cfg.backend, "cuda" if cuda_available else "cpu")
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--backend {cfg.backend!r}: {exc}") from None

    if cfg.init_from is not None and not os.path.isfile(cfg.init_from):
        raise ConfigError(f"--init-from {cfg.init_from!r}: no such file (expected a facebookresearch/DiT "
                          f"checkpoint such as DiT-XL-2-256x256.pt)")
    if cfg.compile not in (None, True, False):
        raise ConfigError(f"compile must be true, false or null (auto: on with CUDA), got {cfg.compile!r}")

    ds = deepspeed_config(cfg, configs_dir, world_size, micro, accum, precision)
    return Plan(cfg=cfg, world_size=world_size, micro_batch=micro, grad_accum=accum, data_path=data_path,
                data_meta=meta, dit=dit, schedule=schedule, strategy=strategy, ds_config=ds,
                use_cuda=cuda_available, precision=precision,
                compile=cuda_available if cfg.compile is None else cfg.compile, loader=loader, loader_note=loader_note)
