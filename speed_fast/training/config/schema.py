"""The run configuration's schema: `TrainConfig` (every field that defines a run), its value types,
and `ConfigError`, the one exception every configuration check raises."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

PRECISIONS = ("auto", "fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
RESUME_MODES = ("auto", "must", "never")


class ConfigError(ValueError):
    """A run configuration that cannot train; the message names the value and what was expected."""


@dataclass
class TrainConfig:
    """Everything that defines a run (written to <run_dir>/config.json). Defaults are the DiT
    paper's ImageNet recipe; presets (train/configs/*.json) override them."""

    preset: str = "custom"
    # model: a name of speed_fast.models.registry: a DiT ("DiT-XL/2", or "custom": sizes from `dit`) or a
    # U-Net ("unet-small", "unet-cifar10", "unet-ldm", or "unet-custom": sizes from `unet`) or a text-to-image
    # DiT ("dit-t2i-s2", "dit-t2i-xl2", or "dit-t2i-custom": sizes from `t2i`). `dit` overrides DiTConfig fields
    # of DiT models, `unet` UNetConfig fields of U-Nets, `t2i` DiTT2IConfig fields; a named model fixes its sizes.
    model: str = "DiT-XL/2"
    dit: dict = field(default_factory=dict)
    unet: dict = field(default_factory=dict)
    t2i: dict = field(default_factory=dict)
    # data: an FFCV .beton of latents (speed_fast.data), "digits" for the embedded default, or "digits-t2i" for
    # the captioned digits (speed_fast.data.digits.ensure_captioned_digits: the tiny CLIP of seed 0).
    data: str = "digits"
    # Text-to-image models only: the probability that a sample's caption is replaced by the null caption's
    # embedding (classifier-free guidance); None: 0.1.
    caption_dropout: float | None = None
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
    run_dir: str | None = None           # default runs/<preset>[-<model>]-<strategy>-seed<seed> (cli.py)
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
                     "tuple": (list, tuple), "int | None": (int, type(None)), "str | None": (str, type(None)),
                     "float | None": (int, float, type(None))}


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
