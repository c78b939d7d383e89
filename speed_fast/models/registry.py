"""Model names -> model families: the one place that knows which backbones the trainer builds.

Three families, each a config dataclass and a module. The class-conditional ones have DiT's calling
convention `model(x, t, y, drop=None) -> [B, 2C or C, H, W]`; the text-to-image one
`model(x, t, tokens [B, L, D_text], pooled [B, D_text])` (speed_fast.models.dit_t2i):

    family  names                                        config        module  run overrides  config.json key
    dit     DiT-{S,B,L,XL}/{2,4,8}, custom               DiTConfig     DiT     train.dit      dit_config
    unet    unet-small, unet-cifar10, unet-ldm, unet-custom  UNetConfig    UNet    train.unet     unet_config
    t2i     dit-t2i-s2, dit-t2i-xl2, dit-t2i-custom      DiTT2IConfig  DiTT2I  train.t2i      t2i_config

    config = model_config("unet-small", overrides, input_size=8, in_channels=1, num_classes=10)
    model = build_model(config)
    config = run_model_config(json.load(open("runs/x/config.json")), "runs/x/config.json")

A named model fixes its sizes (`size_keys`); "custom" / "unet-custom" / "dit-t2i-custom" take every
field from the overrides. The data fixes input size, channels and classes (the text width for t2i).
config.json keeps the family's config under `<family>_config`, so DiT runs read as before.
"""

from __future__ import annotations

import dataclasses

from .dit import DIT_SIZES, PATCH_SIZES, DiT, DiTConfig
from .dit_t2i import T2I_CUSTOM, T2I_SIZE_KEYS, T2I_SIZES, DiTT2I, DiTT2IConfig
from .unet import UNET_CUSTOM, UNET_SIZE_KEYS, UNET_SIZES, UNet, UNetConfig

DIT_SIZE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")  # what a DiT-{S,B,L,XL}/{2,4,8} name fixes
DIT_CUSTOM = "custom"
FAMILIES = {"dit": (DiTConfig, DiT), "unet": (UNetConfig, UNet), "t2i": (DiTT2IConfig, DiTT2I)}
CUSTOM = {"dit": DIT_CUSTOM, "unet": UNET_CUSTOM, "t2i": T2I_CUSTOM}
# The data a named model was made for, (input size, channels, classes): what `speed-fast plan --model`
# describes it on unless told otherwise. DiTs: ImageNet 256 as SD-VAE latents.
# Text-to-image models: (input size, channels, text width D_text).
MADE_FOR = {"unet-small": (8, 1, 10), "unet-cifar10": (32, 3, 10), "unet-ldm": (32, 4, 1000),
            "dit-t2i-s2": (8, 1, 32), "dit-t2i-xl2": (32, 4, 768)}
DEFAULT_INPUT = (32, 4, 1000)


def dit_names() -> list[str]:
    return [f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES]


def model_names() -> list[str]:
    """Every name `--model` takes."""
    return dit_names() + [DIT_CUSTOM] + list(UNET_SIZES) + [UNET_CUSTOM] + list(T2I_SIZES) + [T2I_CUSTOM]


def family_of(name: str) -> str:
    """"dit", "unet" or "t2i" for a model name; ValueError listing the known names otherwise."""
    if name in dit_names() or name == DIT_CUSTOM:
        return "dit"
    if name in UNET_SIZES or name == UNET_CUSTOM:
        return "unet"
    if name in T2I_SIZES or name == T2I_CUSTOM:
        return "t2i"
    raise ValueError(f"model must be one of {model_names()}, got {name!r}")


def size_keys(name: str) -> tuple:
    """The config fields a named model fixes (none for the custom ones)."""
    if name in CUSTOM.values():
        return ()
    return {"dit": DIT_SIZE_KEYS, "unet": UNET_SIZE_KEYS, "t2i": T2I_SIZE_KEYS}[family_of(name)]


def is_text_model(config) -> bool:
    """True for a text-to-image model's config (it takes caption embeddings, not class labels)."""
    return isinstance(config, DiTT2IConfig)


def config_class(family: str):
    return FAMILIES[family][0]


def model_config(name: str, overrides: dict, **fixed):
    """The config of model `name`: its sizes, then `overrides` (the run's `dit` or `unet` settings),
    then `fixed` (what the data and run decide: input size, channels, classes, ...). ValueError
    naming the problem (unknown name or key, a size the name fixes, a value out of range)."""
    family = family_of(name)
    cls = config_class(family)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{family} settings have unknown key(s) {unknown}; {cls.__name__}'s fields are "
                         f"{sorted(known)}")
    clash = sorted(set(overrides) & set(size_keys(name)))
    if clash:
        raise ValueError(f"{name} fixes {clash}, which the {family} settings also give; drop them, or use "
                         f"model {CUSTOM[family]!r} for custom sizes")
    values = {**overrides, **fixed}
    if name == CUSTOM[family]:
        return cls(**values)
    return cls.named(name, **values)


def family_of_config(config) -> str:
    for family, (cls, _) in FAMILIES.items():
        if isinstance(config, cls):
            return family
    raise TypeError(f"not a model config: {type(config).__name__}")


def build_model(config):
    """The module of a config (a DiTConfig, UNetConfig or DiTT2IConfig), freshly initialised (seed torch first)."""
    return FAMILIES[family_of_config(config)][1](config)


def config_key(config) -> str:
    """Where config.json keeps this config: "dit_config", "unet_config" or "t2i_config"."""
    return f"{family_of_config(config)}_config"


def run_model_config(run_config: dict, where: str, **overrides):
    """The model config of a run from its config.json object (`where` names the file in errors):
    exactly one `<family>_config` object whose keys are that family's fields. ValueError otherwise."""
    present = [f for f in FAMILIES if f"{f}_config" in run_config]
    if len(present) != 1:
        found = "none" if not present else " and ".join(f"'{f}_config'" for f in present)
        raise ValueError(f"{where}: expected one model config ('dit_config', 'unet_config' or 't2i_config'), found "
                         f"{found} (is this a run directory written by train/main.py?)")
    key = f"{present[0]}_config"
    values = run_config[key]
    if not isinstance(values, dict):
        raise ValueError(f"{where}: '{key}' is {type(values).__name__}, expected an object (is this a run directory "
                         "written by train/main.py?)")
    cls = config_class(present[0])
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{where}: {key} has unknown keys {unknown}; expected {cls.__name__}'s fields (written by "
                         "another speed_fast version, or edited?)")
    try:
        return cls(**{**values, **overrides})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {key} does not describe a model: {exc}") from None


def describe(name: str, config) -> dict:
    """What the plan shows of a model: family, name, parameters, input and output, and its layout."""
    import torch

    with torch.device("meta"):
        model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    c = config
    out = {"name": name, "family": family_of_config(config), "params": params,
           "input": [c.in_channels, c.input_size, c.input_size], "output": [c.out_channels, c.input_size, c.input_size],
           "learn_sigma": c.learn_sigma}
    if out["family"] == "t2i":
        out.update(text_width=c.text_width)
        out["layout"] = (f"text-to-image DiT: {c.depth} blocks, hidden {c.hidden_size}, {c.num_heads} heads, patch "
                         f"{c.patch_size} ({c.num_patches} tokens), cross-attention to the caption's tokens of width "
                         f"{c.text_width}, adaLN on t + pooled caption")
        return out
    out.update(classes=c.num_classes, null_class=c.class_dropout_prob > 0)
    if out["family"] == "dit":
        out["layout"] = (f"DiT: {c.depth} blocks, hidden {c.hidden_size}, {c.num_heads} heads, patch {c.patch_size} "
                         f"({c.num_patches} tokens)")
    else:
        sizes = [c.input_size // 2 ** i for i in range(len(c.channel_mult))]
        attn = [f"{sizes[i]}x{sizes[i]}" for i in c.attention_levels] + ["middle"]
        heads = "one head" if c.attention_head_dim is None else f"head width {c.attention_head_dim}"
        out["layout"] = (f"diffusers UNet2DModel: {len(sizes)} down + {len(sizes)} up blocks at "
                         f"{', '.join(f'{s}x{s}' for s in sizes)}, widths {list(c.widths)}, {c.layers_per_block} ResNet "
                         f"block(s) per down block ({c.layers_per_block + 1} per up block), attention at "
                         f"{', '.join(attn)} ({heads})")
    return out


def format_description(d: dict) -> str:
    cin, h, w = d["input"]
    if d["family"] == "t2i":
        classes = f"caption embeddings of width {d['text_width']} (null caption: caption dropout, guidance)"
    else:
        classes = f"{d['classes']} classes" + (" + null class (label dropout, guidance)" if d["null_class"] else "")
    sigma = "eps + learned sigma" if d["learn_sigma"] else "eps"
    return (f"model     {d['name']}  {d['params'] / 1e6:.2f}M parameters  input {cin}x{h}x{w} -> output "
            f"{d['output'][0]}x{h}x{w} ({sigma}), {classes}\n          {d['layout']}")


def probe_model_attention(config, device) -> None:
    """One real call of the model's attention backend on `device` (`speed_fast.models.dit.probe_attention`:
    a DiT asked to use xformers); a U-Net's attention is diffusers' SDPA processor, nothing to probe."""
    from .dit import probe_attention

    if family_of_config(config) in ("dit", "t2i"):
        probe_attention(config.attn_backend, device, head_dim=config.hidden_size // config.num_heads)
