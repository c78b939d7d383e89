"""Samplers for trained models: respacing, DDPM (learned sigma), DDIM, classifier-free guidance.

The model contract is DiT's: `model(x [B, C, H, W], t int64 [B], y int64 [B]) -> [B, 2C, H, W]`
(eps, then the learned-sigma value v; [B, C, H, W] when `learn_sigma=False`). Label index
`num_classes` is the null (unconditional) label. A text-to-image model (speed_fast.models.dit_t2i) is
called `model(x, t, tokens [B, L, D], pooled [B, D])` with its samples' caption embeddings (`text=`),
and guidance's unconditional branch is the null caption's embedding (`null_text=`). All noise-schedule math lives in
`speed_fast.diffusion.GaussianDiffusion`; this module only walks the chain.

Respacing follows DiT/IDDPM's `space_timesteps`: "250" keeps 250 evenly spaced steps
(rounded fractional stride), "10,15,20" splits [0, T) in three sections with that many steps
each, "ddim50" keeps range(0, T, stride) with exactly 50 entries. The kept steps get new betas
beta_i = 1 - abar_{k_i} / abar_{k_{i-1}}, so the respaced chain has the same marginals, and the
model is always called with the original step k_i (`GaussianDiffusion.timestep_map`).

Classifier-free guidance (Ho & Salimans 2022) is applied to ALL C eps channels by default:
eps = eps_uncond + s (eps_cond - eps_uncond). DiT's `forward_with_cfg` guides only the first 3
of 4 latent channels (a known bug); `guided_channels=3` reproduces it (to match published DiT
numbers). The learned-sigma half (and unguided eps channels) is taken from the conditional branch.

Determinism: sample i of a call with seed s draws everything (its label when y is None, x_T,
then one noise tensor per step) from its own CPU `torch.Generator` seeded with
`(s * 2654435761 + i) mod 2^32` (torch's CPU generator keeps 32 bits of a seed). Seeds are
therefore distinct within a set of up to 2^32 samples, and the images do not depend on the
batch size or on the device (up to the model's own floating-point differences).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence

import torch

from .diffusion import GaussianDiffusion
from .schedule import NoiseSchedule

METHODS = ("ddpm", "ddim")
_SEED_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant: spreads the sets of seeds s, s + 1


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """The original steps (sorted, 0-based) a respaced sampler keeps (DiT/IDDPM semantics).

    section_counts: an int or "N" (N evenly spaced steps), "a,b,c" or a sequence (the range is cut
    into equal sections, a steps taken from the first, b from the second, ...), or "ddimN"
    (range(0, T, stride) with exactly N entries, as DDIM uses)."""
    T = operator.index(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"steps {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            if desired == T:
                return list(range(T))
            raise ValueError(f"steps {section_counts!r}: no integer stride gives exactly {desired} of T={T} steps")
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"steps must be an integer, 'a,b,...' or 'ddimN', got {section_counts!r}") from None
    elif isinstance(section_counts, Sequence):
        counts = [operator.index(c) for c in section_counts]
    else:
        counts = [operator.index(section_counts)]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"steps must be positive step counts, got {section_counts!r}")
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"steps {section_counts!r}: cannot take {count} steps from a section of {size} (T={T})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def respace(schedule: NoiseSchedule, use_timesteps) -> tuple[NoiseSchedule, torch.Tensor]:
    """(respaced schedule, timestep_map int64) keeping the steps `use_timesteps` of `schedule`."""
    steps = sorted(set(int(t) for t in use_timesteps))
    if not steps or steps[0] < 0 or steps[-1] >= schedule.T:
        raise ValueError(f"use_timesteps must be steps in [0, {schedule.T}), got {steps[:3]}...{steps[-3:]}")
    abar = schedule.alphas_cumprod[steps]  # (S,) float64
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1.0 - abar / prev
    respaced = NoiseSchedule(kind="respaced", T=len(steps), beta_start=None, beta_end=None, betas=betas)
    return respaced, torch.tensor(steps, dtype=torch.int64)


def respaced_diffusion(schedule: NoiseSchedule, steps, device="cpu", learn_sigma: bool = True) -> GaussianDiffusion:
    """A GaussianDiffusion over `space_timesteps(schedule.T, steps)` that calls the model at the original steps."""
    kept = space_timesteps(schedule.T, steps)
    respaced, timestep_map = respace(schedule, kept)
    return GaussianDiffusion(respaced, device=device, learn_sigma=learn_sigma, timestep_map=timestep_map)


def guided_output(model, x, t, y, cfg_scale: float, null_label, channels: int):
    """The model output with classifier-free guidance on all `channels` eps channels.

    y: class labels int64 [B] with `null_label` the null class, or a text model's (tokens [B, L, D],
    pooled [B, D]) with `null_label` the null caption's (tokens [L, D], pooled [D]). cfg_scale == 1
    calls the model once on (x, t, y). Otherwise the batch is doubled with the null label (caption),
    eps = eps_u + cfg_scale (eps_c - eps_u) on every channel, and the remaining channels (learned
    sigma) come from the conditional branch."""
    cond = y if isinstance(y, tuple) else (y,)
    if cfg_scale == 1.0:
        return model(x, t, *cond)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the model's null label (num_classes) or null caption, "
                         "got None")
    B = x.shape[0]
    if isinstance(y, tuple):
        null = tuple(n.expand(B, *n.shape) for n in null_label)
    else:
        null = (torch.full_like(y, null_label),)
    out = model(torch.cat([x, x]), torch.cat([t, t]), *(torch.cat([c, u]) for c, u in zip(cond, null)))
    cond, uncond = out[:B], out[B:]  # (B, 2C, H, W) each
    eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([eps, cond[:, channels:]], dim=1)


def ddpm_step(diffusion: GaussianDiffusion, model_out, x, t, noise, clip_denoised: bool = False):
    """x_{t-1} ~ p(x_{t-1} | x_t): the posterior mean plus exp(log_variance / 2) noise (no noise at t = 0)."""
    out = diffusion.p_mean_variance(model_out, x, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise


def ddim_step(diffusion: GaussianDiffusion, model_out, x, t, noise, eta: float = 0.0, clip_denoised: bool = False):
    """One DDIM update (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""
    out = diffusion.p_mean_variance(model_out, x, t, clip_denoised=clip_denoised)
    pred_x0 = out["pred_xstart"]
    # With clipping, eps must be re-derived so that x0 and eps stay consistent (as DiT does).
    eps = diffusion.eps_from_pred_xstart(x.float(), t, pred_x0) if clip_denoised else out["eps"]
    abar = diffusion.alphas_cumprod[t]  # (B,) float64
    abar_prev = diffusion.alphas_cumprod_prev[t]
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
    dir_coef = torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0))
    view = (-1, *([1] * (x.ndim - 1)))
    x_prev = (abar_prev.sqrt().float().view(view) * pred_x0 + dir_coef.float().view(view) * eps)
    nonzero = (t != 0).float().view(view)
    return x_prev + nonzero * sigma.float().view(view) * noise


def sample_seed(seed: int, index: int) -> int:
    """The CPU generator seed of sample `index` in a set drawn with `seed` (see the module docstring)."""
    return (seed * _SEED_MULTIPLIER + index) % 2**32


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not hasattr(seed, "__index__") or operator.index(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return operator.index(seed)


def _model_attr(model, name: str):
    """model.<name>, else model.config.<name> (DiT keeps input_size and learn_sigma in its config)."""
    value = getattr(model, name, None)
    return getattr(getattr(model, "config", None), name, None) if value is None else value


def _infer_shape(model, shape):
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape!r}")
        return shape
    C, size = _model_attr(model, "in_channels"), _model_attr(model, "input_size")
    if C is None or size is None:
        raise ValueError("shape=None needs model.in_channels and model.input_size (or model.config.input_size); "
                         "pass shape=(C, H, W)")
    return (int(C), int(size), int(size))


def _labels(y, n: int, num_classes, gens) -> torch.Tensor:
    if y is None:
        if num_classes is None:
            raise ValueError("y=None draws random labels and needs num_classes (or model.num_classes), got None")
        return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])
    y = torch.as_tensor(y, dtype=torch.int64)
    if y.ndim == 0:
        y = y.expand(n)
    if y.shape != (n,):
        raise ValueError(f"y must be an int, None or {n} labels, got shape {tuple(y.shape)}")
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = null), got {int(y.min())}..{int(y.max())}")
    return y.clone()


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, n: int, y=None, *, steps=250, method: str = "ddpm",
           cfg_scale: float = 1.0, eta: float = 0.0, seed: int = 0, device=None, batch_size: int = 64,
           num_classes: int | None = None, shape=None, learn_sigma: bool | None = None,
           clip_denoised: bool = False, return_labels: bool = False, progress: bool = False,
           first_index: int = 0, guided_channels: int | None = None, text=None, null_text=None):
    """Draw n samples x0 (float32 [n, C, H, W], on the CPU) from `model` trained on `schedule`.

    steps: respacing spec (int, "250", "ddim50", "10,20"); method "ddpm" (ancestral, learned sigma)
    or "ddim" (eta = 0 deterministic); y: None (uniform random labels drawn per sample), an int
    (the same label for all; `num_classes` is unconditional) or n labels. num_classes and shape
    default to model.num_classes and (model.in_channels, model.input_size, model.input_size);
    learn_sigma to model.learn_sigma (or model.config.learn_sigma), else True.
    The model is put in eval mode for the call and restored afterwards. With return_labels=True,
    returns (x0, labels). first_index: the samples are items first_index .. first_index + n - 1
    of the seed's set (so ranks can each draw a slice of one set; the default draws its start).
    guided_channels: how many leading eps channels guidance acts on (default all C; 3 of 4 is DiT's
    `forward_with_cfg`, the others then come from the conditional branch).
    text: a text-to-image model's conditions (tokens [n, L, D], pooled [n, D]), one per sample, instead of
    y (no labels are drawn; return_labels gives None for them); null_text: the null caption's (tokens
    [L, D], pooled [D]), guidance's unconditional branch (needed when cfg_scale != 1)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, batch_size = operator.index(n), operator.index(batch_size)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    cfg_scale, eta = float(cfg_scale), float(eta)
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be finite and >= 0, got {cfg_scale!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    seed = _check_seed(seed)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    num_classes = getattr(model, "num_classes", None) if num_classes is None else int(num_classes)
    shape = _infer_shape(model, shape)
    if learn_sigma is None:
        learn_sigma = _model_attr(model, "learn_sigma")
        learn_sigma = True if learn_sigma is None else bool(learn_sigma)
    diffusion = respaced_diffusion(schedule, steps, device=device, learn_sigma=learn_sigma)
    if isinstance(first_index, bool) or not hasattr(first_index, "__index__") or operator.index(first_index) < 0:
        raise ValueError(f"first_index must be a non-negative integer, got {first_index!r}")
    first_index = operator.index(first_index)
    guided = shape[0] if guided_channels is None else operator.index(guided_channels)
    if not 1 <= guided <= shape[0]:
        raise ValueError(f"guided_channels must be in [1, {shape[0]}] (the data's channels), got {guided_channels!r}")
    gens = [torch.Generator().manual_seed(sample_seed(seed, first_index + i)) for i in range(n)]
    if text is not None:
        labels = None
        text, null = _text_conditions(text, null_text, n, cfg_scale, device)
    else:
        labels = _labels(y, n, num_classes, gens)
        null = num_classes
        if cfg_scale != 1.0 and num_classes is not None and bool((labels == num_classes).any()):
            raise ValueError("classifier-free guidance needs class labels; got the null label in y")

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    chunks = []
    need_noise = method == "ddpm" or eta > 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=math.ceil(n / batch_size) * diffusion.T, desc="sampling", leave=False)
    try:
        for start in range(0, n, batch_size):
            b = range(start, min(start + batch_size, n))
            x = torch.stack([torch.randn(shape, generator=gens[j]) for j in b]).to(device)  # (B, C, H, W)
            if text is None:
                yb = labels[b.start:b.stop].to(device)  # (B,)
            else:
                yb = tuple(a[b.start:b.stop].to(device) for a in text)  # (B, L, D), (B, D)
            for i in range(diffusion.T - 1, -1, -1):
                t = torch.full((len(b),), i, dtype=torch.int64, device=device)
                model_out = guided_output(model, x, diffusion.timestep_map[t], yb, cfg_scale, null, guided)
                noise = torch.stack([torch.randn(shape, generator=gens[j]) for j in b]).to(device) if need_noise else 0.0
                if method == "ddpm":
                    x = ddpm_step(diffusion, model_out, x, t, noise, clip_denoised)
                else:
                    x = ddim_step(diffusion, model_out, x, t, noise, eta, clip_denoised)
                if bar is not None:
                    bar.update(1)
            chunks.append(x.float().cpu())
    finally:
        if bar is not None:
            bar.close()
        if hasattr(model, "train"):
            model.train(was_training)
    x0 = torch.cat(chunks)
    return (x0, labels) if return_labels else x0


def _text_conditions(text, null_text, n: int, cfg_scale: float, device) -> tuple:
    """((tokens fp32 [n, L, D], pooled fp32 [n, D]) on the CPU, the null caption's (tokens [L, D], pooled [D])
    on `device`, or None without guidance), checked."""
    if not (isinstance(text, (tuple, list)) and len(text) == 2):
        raise ValueError(f"text must be (tokens [n, L, D], pooled [n, D]), got {type(text).__name__}")
    tokens, pooled = (torch.as_tensor(a).float().cpu() for a in text)
    if tokens.ndim != 3 or pooled.ndim != 2 or tokens.shape[0] != n or pooled.shape != (n, tokens.shape[2]):
        raise ValueError(f"text must be tokens [n, L, D] and pooled [n, D] with n = {n}, got {list(tokens.shape)} "
                         f"and {list(pooled.shape)}")
    if cfg_scale == 1.0:
        return (tokens, pooled), None
    if null_text is None:
        raise ValueError("classifier-free guidance of a text model needs null_text (the null caption's tokens [L, D] "
                         "and pooled [D]), got None")
    null = tuple(torch.as_tensor(a).float().to(device) for a in null_text)
    if null[0].shape != tokens.shape[1:] or null[1].shape != pooled.shape[1:]:
        raise ValueError(f"null_text must be tokens {list(tokens.shape[1:])} and pooled {list(pooled.shape[1:])} like "
                         f"the samples' text, got {list(null[0].shape)} and {list(null[1].shape)}")
    return (tokens, pooled), null


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (round to nearest, clipped), as FID tools quantise samples."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 1, scale: int | None = None) -> torch.Tensor:
    """uint8 [H', W', C] grid of images [N, C, H, W] in [-1, 1] (C = 1 or 3), `nrow` per row,
    each image enlarged `scale` times (nearest; default: to at least 64 px)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    N, C, H, W = images.shape
    nrow = operator.index(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    scale = max(1, math.ceil(64 / max(H, W))) if scale is None else operator.index(scale)
    img = to_uint8(images.detach().cpu())
    if scale > 1:
        img = img.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    H, W = H * scale, W * scale
    ncol = min(nrow, N)
    nrows = math.ceil(N / ncol)
    grid = torch.full((C, nrows * (H + padding) + padding, ncol * (W + padding) + padding), 255, dtype=torch.uint8)
    for k in range(N):
        r, c = divmod(k, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = img[k]
    return grid.permute(1, 2, 0).contiguous()


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, padding: int = 1, scale: int | None = None) -> str:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid; returns the path."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding, scale=scale).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    return path
