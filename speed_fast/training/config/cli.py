"""The trainer's command line: flags over a preset (`deepspeed train/main.py --help`)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ...models.registry import CUSTOM, DIT_SIZE_KEYS, config_class, family_of
from ...models.dit_t2i import T2I_SIZE_KEYS
from ...models.unet import UNET_SIZE_KEYS
from ...timesteps import STRATEGIES, STRATEGY_PARAMS
from .presets import DEFAULT_PRESET, load_preset
from .schema import PRECISIONS, RESUME_MODES, ZERO_STAGES, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepspeed train/main.py",
        description="Train a DiT, a U-Net or a text-to-image DiT with SpeeD under DeepSpeed. With no arguments: "
                    "the 'digits' preset (scikit-learn's 8x8 digits, a small DiT, SpeeD) to completion, CPU included.")
    S = argparse.SUPPRESS
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=DEFAULT_PRESET, help="preset name in train/configs or a JSON path "
                   "(default: digits)")
    g.add_argument("--run-dir", default=S, help="run directory (default runs/<preset>-<strategy>-seed<seed>; "
                   "with a --model other than the preset's, runs/<preset>-<model>-<strategy>-seed<seed>)")
    g.add_argument("--resume", nargs="?", const="must", default=S, choices=RESUME_MODES,
                   help="resume from the run dir's latest complete checkpoint: 'auto' (default) when there "
                        "is one, 'must' (bare --resume) fails without one, 'never' starts over")
    for flag in ("--max-steps", "--seed", "--log-every", "--ckpt-every", "--keep-ckpts"):
        g.add_argument(flag, type=int, default=S)
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
    g.add_argument("--model", default=S, help="DiT-{S,B,L,XL}/{2,4,8}, 'custom' (sizes from the preset's dit "
                   "fields), a U-Net: unet-small (digits), unet-cifar10, unet-ldm (the paper's Tab. 7), or "
                   "'unet-custom' (sizes from the preset's unet fields), a text-to-image DiT on captioned data: "
                   "dit-t2i-s2 (digits), dit-t2i-xl2 (the paper's Tab. 5) or 'dit-t2i-custom' (sizes from the "
                   "preset's t2i fields). A named model replaces the preset's sizes")
    g.add_argument("--data", default=S, help="latent .beton (speed_fast.data), 'digits', or 'digits-t2i' (the "
                   "captioned digits)")
    g.add_argument("--caption-dropout", type=float, default=S, metavar="P",
                   help="text-to-image models: replace a sample's caption by the null caption's embedding with "
                        "probability P (classifier-free guidance; default 0.1)")
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
    g.add_argument("--importance-weights", dest="strategy.importance_weights", action=argparse.BooleanOptionalAction,
                   default=S, help="loss_moment: weight the loss by 1 / (T P(t)) (unbiased; default off)")
    g.add_argument("--backend", default=S, help="fused SpeeD ops backend: auto | torch | cpp | triton")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch", type=int, default=S)
    g.add_argument("--micro-batch", type=int, default=S, help="per-rank micro batch (accumulation = global "
                   "/ (world x micro))")
    for flag, typ in (("--lr", float), ("--weight-decay", float), ("--warmup-steps", int), ("--grad-clip", float),
                      ("--ema-decay", float)):
        g.add_argument(flag, type=typ, default=S)
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


# Settings model families share: a preset's value for one family is the run's for another when --model
# switches family (the digits preset's dit class_dropout_prob then applies to a U-Net), where that family
# has the setting (a text-to-image DiT has no class dropout).
SHARED_MODEL_KEYS = ("class_dropout_prob", "learn_sigma")
SIZE_KEYS = {"dit": DIT_SIZE_KEYS, "unet": UNET_SIZE_KEYS, "t2i": T2I_SIZE_KEYS}


def _switch_model(cfg: TrainConfig, name: str) -> None:
    """The preset's model settings for --model `name` instead of the preset's model: a named model drops
    the preset's custom sizes of every family (the digits preset's hidden_size, depth, ...), which the
    name fixes; another family than the preset's takes over the shared settings it has (SHARED_MODEL_KEYS) and
    nothing else. An unknown name is left to resolve(), which lists the known ones."""
    try:
        new, old = family_of(name), family_of(cfg.model)
    except ValueError:
        return
    if name not in CUSTOM.values():
        for family, keys in SIZE_KEYS.items():
            setattr(cfg, family, {k: v for k, v in getattr(cfg, family).items() if k not in keys})
    if new != old:
        before = getattr(cfg, old)
        fields = {f.name for f in dataclasses.fields(config_class(new))}
        shared = [k for k in SHARED_MODEL_KEYS if k in before and k in fields]
        setattr(cfg, new, {**{k: before[k] for k in shared}, **getattr(cfg, new)})
        setattr(cfg, old, {})


def parse_args(argv: list[str], configs_dir: str) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, raw namespace): the preset with the given flags applied."""
    ns = build_parser().parse_args(argv)
    cfg = load_preset(ns.preset, configs_dir)
    flags = {k: v for k, v in vars(ns).items() if k not in ("preset", "local_rank")}
    strategy_flags = {k.split(".", 1)[1]: v for k, v in flags.items() if k.startswith("strategy.")}
    if "strategy" in flags and flags["strategy"] != cfg.strategy:
        cfg.strategy_params = {}  # the preset's parameters belong to its own strategy
    model_changed = "model" in flags and flags["model"] != cfg.model
    if model_changed:
        _switch_model(cfg, flags["model"])
    for key, value in flags.items():
        if not key.startswith("strategy."):
            setattr(cfg, key, value)
    cfg.strategy_params = {**cfg.strategy_params, **strategy_flags}
    if cfg.run_dir is None:
        # Another model than the preset's gets its own directory (a resume would refuse the change anyway).
        model = f"-{cfg.model.replace('/', '-')}" if model_changed else ""
        cfg.run_dir = os.path.join("runs", f"{cfg.preset}{model}-{cfg.strategy}-seed{cfg.seed}")
    return cfg, ns
