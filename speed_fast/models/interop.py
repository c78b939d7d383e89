"""Checkpoint interop with facebookresearch/DiT: its state dicts in, ours out in its format.

Our `DiT` computes the same function as DiT's `models.py` when weights are copied by name
(checked: the outputs agree exactly for DiT-S/2). The state dicts differ in two places:

* the patch embedding: DiT's timm `PatchEmbed` holds `x_embedder.proj.{weight,bias}`; ours is
  the bare convolution, `x_embedder.{weight,bias}`;
* the position embedding: DiT keeps its fixed 2-D sin-cos table `pos_embed` [1, N, D] as a
  frozen parameter, so it is in DiT's state dict; ours is a buffer rebuilt from the config and
  is not. Loading checks that the file's table equals ours (a different grid or hidden size,
  or another embedding, would silently change the model otherwise).

    from speed_fast.models import DiT, DiTConfig, load_dit_state_dict, to_dit_state_dict
    model = DiT(DiTConfig.named("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000))
    load_dit_state_dict(model, torch.load("DiT-XL-2-256x256.pt", weights_only=True))  # a released checkpoint
    torch.save(to_dit_state_dict(model.state_dict(), model.config), "for-dit.pt")      # DiT's sample.py reads it

A DiT training checkpoint ({"model", "ema", "opt", "args"}) is read as DiT's own `find_model`
reads it: its "ema" weights.
"""

from __future__ import annotations

import torch

from .dit import DIT_SIZES, PATCH_SIZES, DiT, DiTConfig, sincos_pos_embed_2d

_OURS_TO_DIT = {"x_embedder.weight": "x_embedder.proj.weight", "x_embedder.bias": "x_embedder.proj.bias"}
_DIT_TO_OURS = {v: k for k, v in _OURS_TO_DIT.items()}
POS_EMBED_ATOL = 1e-6  # float32 rounding of the same float64 table


def _unwrap(state_dict: dict) -> dict:
    if not isinstance(state_dict, dict):
        raise ValueError(f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
    if "ema" in state_dict and isinstance(state_dict["ema"], dict):
        return state_dict["ema"]  # a DiT training checkpoint: its EMA weights, as DiT's find_model does
    return state_dict


def dit_model_name(config: DiTConfig) -> str:
    """The name DiT's `DiT_models` builds this config with ("DiT-XL/2", ...); ValueError when DiT's
    model family cannot express it (DiT fixes 4 input channels, learned sigma, MLP ratio 4 and a
    null class for guidance; a U-Net is no DiT at all)."""
    if not isinstance(config, DiTConfig):
        raise ValueError(f"this run's model is a {type(config).__name__}, not a DiT; only DiT models can be written in "
                         "facebookresearch/DiT's format")
    size = next((s for s, (d, h, n) in DIT_SIZES.items()
                 if (d, h, n) == (config.depth, config.hidden_size, config.num_heads)), None)
    problems = []
    if size is None or config.patch_size not in PATCH_SIZES:
        problems.append(f"depth/hidden/heads/patch {config.depth}/{config.hidden_size}/{config.num_heads}/"
                        f"{config.patch_size} is not a DiT-{{S,B,L,XL}}/{{2,4,8}} model")
    if config.in_channels != 4:
        problems.append(f"in_channels={config.in_channels} (DiT: 4, SD-VAE latents)")
    if not config.learn_sigma:
        problems.append("learn_sigma=False (DiT: True)")
    if config.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={config.mlp_ratio} (DiT: 4)")
    if config.class_dropout_prob <= 0:
        problems.append("class_dropout_prob=0 (DiT's label table has a null class)")
    if problems:
        raise ValueError("this model cannot be written in facebookresearch/DiT's format: " + "; ".join(problems))
    return f"DiT-{size}/{config.patch_size}"


def to_dit_state_dict(state_dict: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """Our state dict (e.g. a run's ema.pt) in DiT's naming, with DiT's `pos_embed`, as float32 CPU
    tensors: what DiT's `sample.py --model NAME --ckpt FILE` loads strictly."""
    dit_model_name(config)
    if "x_embedder.weight" not in state_dict:
        raise ValueError("expected a speed_fast DiT state dict (with 'x_embedder.weight'), got keys "
                         f"{sorted(state_dict)[:6]}...")
    out = {}
    for name, tensor in state_dict.items():
        out[_OURS_TO_DIT.get(name, name)] = tensor.detach().to("cpu", torch.float32).contiguous()
    grid = config.input_size // config.patch_size
    out["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, grid)).float().unsqueeze(0)
    return out


def from_dit_state_dict(state_dict: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """A facebookresearch/DiT state dict (or training checkpoint) in our naming, after checking
    that its `pos_embed` is the table `config` builds."""
    sd = _unwrap(state_dict)
    if "pos_embed" not in sd:
        raise ValueError(f"not a facebookresearch/DiT state dict: no 'pos_embed' (keys: {sorted(sd)[:6]}...)")
    grid = config.input_size // config.patch_size
    ours = torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, grid)).float().unsqueeze(0)  # (1, N, D)
    theirs = sd["pos_embed"]
    if tuple(theirs.shape) != tuple(ours.shape):
        raise ValueError(f"pos_embed has shape {tuple(theirs.shape)}, this model's is {tuple(ours.shape)} "
                         f"(input_size {config.input_size}, patch {config.patch_size}, hidden {config.hidden_size})")
    err = (theirs.detach().float().cpu() - ours).abs().max().item()
    if err > POS_EMBED_ATOL:
        raise ValueError(f"pos_embed differs from this model's 2-D sin-cos table by up to {err:.3g} "
                         f"(allowed {POS_EMBED_ATOL}): not the position embedding this DiT uses")
    return {_DIT_TO_OURS.get(name, name): tensor for name, tensor in sd.items() if name != "pos_embed"}


@torch.no_grad()
def load_dit_state_dict(model: DiT, state_dict: dict) -> DiT:
    """Load a facebookresearch/DiT state dict into our `model` (strict: every tensor must match by
    name and shape); returns the model."""
    sd = from_dit_state_dict(state_dict, model.config)
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    wrong = sorted(k for k in set(ours) & set(sd) if tuple(ours[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        shapes = {k: f"{tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}" for k in wrong[:5]}
        raise ValueError(f"the DiT state dict does not match this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes {shapes}")
    model.load_state_dict(sd)
    return model


def read_dit_checkpoint(path: str, config: DiTConfig) -> dict:
    """The state dict in the file `path` (a facebookresearch/DiT checkpoint for --init-from),
    checked against the model `config` builds before any model exists: loadable with
    weights_only=True (nothing in it runs), every tensor of the model present with its shape,
    nothing extra, real floating-point and finite. ValueError naming the file and the problem."""
    import os
    import pickle
    import zipfile

    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes); expected a facebookresearch/DiT checkpoint")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path} is not a loadable weights-only torch file ({type(exc).__name__}: {reason})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds {type(raw).__name__}, expected a state dict")
    try:
        sd = from_dit_state_dict(raw, config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    with torch.device("meta"):
        ours = {k: v.shape for k, v in DiT(config).state_dict().items()}
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    wrong = sorted(k for k in set(ours) & set(sd)
                   if not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != tuple(ours[k]))
    if missing or unexpected or wrong:
        shapes = {k: f"{tuple(getattr(sd[k], 'shape', ()))} vs ours {tuple(ours[k])}" for k in wrong[:3]}
        raise ValueError(f"{path} does not match {dit_model_name_or_custom(config)}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, shapes {shapes}")
    for name, t in sd.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: {name} has dtype {t.dtype}; expected real floating-point weights")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {name} holds NaN or infinite values; expected finite weights")
    return raw


def dit_model_name_or_custom(config: DiTConfig) -> str:
    try:
        return dit_model_name(config)
    except ValueError:
        return f"this model (hidden {config.hidden_size}, depth {config.depth}, patch {config.patch_size})"
