"""Samples of a trained run: load its checkpoint, sample, decode latents with a local VAE.

What `speed-fast sample` and `speed-fast eval RUN_DIR` draw:

    x = generate(run_dir, n, ema=True, steps="ddim25", method="ddim", seed=0, device="cpu")

The run's model comes from the trainer's inference loader (speed_fast.training.load_for_inference),
the samples from speed_fast.sampling.sample, and runs on latents are decoded with speed_fast.vae.

A text-to-image run samples from prompts (`RunSampler(..., prompts=[...])`): sample i takes prompt
i mod P, embedded by the text encoder the run's data names (its sidecar's `text.encoder`, kept in
config.json; `text_encoder=` for another of the same width and token count) and rounded to float16
as the training data stores it; guidance's unconditional branch is the data's null caption. A prompt
longer than the encoder's token count (77 for CLIP) is truncated to it, as CLIP does; `truncated`
counts them, for the one warning line the command prints.
"""

from __future__ import annotations

import math
import os

import torch

from .devices import resolve_device
from .models.registry import is_text_model, run_model_config


PRECISIONS = ("fp32", "bf16")  # the model's forward pass; the sampler's arithmetic is always fp32 (float64 tables)


def check_sampling_options(n: int, batch_size: int, cfg: float, eta: float, labels: str | None,
                           cfg_channels: int | None = None, precision: str = "fp32",
                           n_flag: str = "--num-samples") -> None:
    """The sampling options' values, before a model is loaded (ValueError naming the flag)."""
    if n < 1:
        raise ValueError(f"{n_flag} must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"--cfg must be a finite number >= 0, got {cfg!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1], got {eta!r}")
    if cfg_channels is not None and cfg_channels < 1:
        raise ValueError(f"--cfg-channels must be >= 1 (how many leading eps channels guidance acts on), "
                         f"got {cfg_channels}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    parse_labels(labels, 1)


def parse_labels(spec: str | None, n: int, start: int = 0) -> torch.Tensor | None:
    """int64 [n]: comma-separated class labels cycled over samples start .. start + n - 1 of a set
    (None: random per sample)."""
    if spec is None:
        return None
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {spec!r}") from None
    if not values:
        raise ValueError(f"--labels must name at least one class, got {spec!r}")
    return torch.tensor([values[(start + i) % len(values)] for i in range(n)], dtype=torch.int64)


def read_prompts(prompts: list[str] | None, path: str | None) -> list[str] | None:
    """The prompts of --prompt (repeatable) or --prompts FILE (one a line; blank lines skipped), or None
    for neither. `--prompt ""` is the null caption: those samples are unconditional (the data's stored
    null embedding, what caption dropout trained on; guidance has no effect on them). ValueError for
    both flags, an unreadable or empty file, or a --prompt of whitespace only (neither text nor the
    null caption)."""
    if prompts and path is not None:
        raise ValueError(f"--prompt and --prompts {path!r}: give one of them")
    if prompts:
        blank = [p for p in prompts if p and not p.strip()]
        if blank:
            raise ValueError(f"--prompt {blank[0]!r}: only whitespace; expected text, or \"\" for the null caption "
                             "(unconditional samples)")
        return list(prompts)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts {path!r}: cannot read it ({type(exc).__name__}: {exc}); expected a UTF-8 text "
                         "file with one prompt a line") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"--prompts {path!r} holds no prompts (empty file); expected one prompt a line")
    return lines


def sample_footprint(run_dir: str, n: int, vae: str | None, batch_size: int, outputs: dict[str, str | None]) -> dict:
    """What `n` samples of the run will take (speed_fast.sampling_job), checked before any model is
    loaded: on disk the finished chunks (uint8 [H, W, 3] and an int64 label per sample, next to the
    first output) plus each output (the .npz the same again; a grid PNG at most its raw uint8 size,
    of at most MAX_GRID_IMAGES samples) against the free disk of each output's file system; in
    memory one batch (float32) and the grid (uint8) against the available memory. ValueError with
    the estimate when they do not fit; else the estimate (for printing)."""
    import shutil

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    config = check_run_config(run_dir_of(run_dir))
    model = run_model_config(config, "config.json")
    shape = (config.get("data_meta") or {}).get("shape") or [model.in_channels, model.input_size, model.input_size]
    c, h, w = (3, 8 * shape[1], 8 * shape[2]) if vae is not None else tuple(shape)
    per_image = 3 * h * w + 8  # uint8 [H, W, 3] and its int64 label
    need_disk = {}
    for i, (flag, path) in enumerate((f, p) for f, p in outputs.items() if p is not None):
        need = n * per_image if path.lower().endswith(".npz") else min(n, MAX_GRID_IMAGES) * 3 * (h + 1) * (w + 1)
        if i == 0:
            need += n * per_image  # the finished chunks, kept next to the first output until it is written
        device = os.stat(_existing_parent(path)).st_dev
        entry = need_disk.setdefault(device, [path, 0])
        entry[1] += need
    for path, need in need_disk.values():
        free = shutil.disk_usage(_existing_parent(path)).free
        if need > free:
            raise ValueError(f"--num-samples {n}: the outputs need about {need:,} bytes ({n} samples of {h}x{w}x3 "
                             f"uint8, from {c}x{h}x{w}), {free:,} are free on the file system of {path}")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: the disk check stands alone
        available = None
    need_mem = min(n, batch_size) * 4 * c * h * w + min(n, MAX_GRID_IMAGES) * 3 * h * w
    if available is not None and need_mem > available:
        raise ValueError(f"--batch-size {batch_size}: a batch of {c}x{h}x{w} samples (float32) and the grid need "
                         f"about {need_mem:,} bytes of memory, {available:,} are available; use a smaller --batch-size")
    return {"shape": (c, h, w), "memory_bytes": need_mem, "disk_bytes": sum(v[1] for v in need_disk.values())}


def _existing_parent(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    return d


def run_dir_of(path: str) -> str:
    """The run directory of `path`: itself, or the run holding it when it is a checkpoint directory."""
    from .training.checkpoint import STATE_FILE

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


def check_run_config(run_dir: str) -> dict:
    """A run's config.json, checked for what loading its model needs (through the one JSON reader):
    one model config (`dit_config` or `unet_config`, speed_fast.models.registry) whose keys are its
    family's fields, and `train.schedule`. ValueError naming the file."""
    from .jsonfile import read_json_object

    path = os.path.join(run_dir, "config.json")
    config = read_json_object(path)
    run_model_config(config, path)
    train = config.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("schedule"), dict):
        raise ValueError(f"{path}: 'train.schedule' is missing; expected the run's noise schedule")
    return config


def load_checked(run_dir: str, ema: bool, device="cpu", checkpoint: str | None = None):
    """load_for_inference(run_dir, ...) with config.json checked first and weights that do not fit
    the model (a wrong shape) named as a ValueError instead of torch's RuntimeError."""
    import sys

    from .training.checkpoint import checkpoint_tags, load_for_inference

    check_run_config(run_dir)
    try:
        if checkpoint is None:  # the newest usable one, saying which when newer ones are damaged
            problems = []
            for tag in reversed(checkpoint_tags(os.path.join(run_dir, "checkpoints"))):
                try:
                    loaded = load_for_inference(run_dir, ema=ema, device=device, checkpoint=tag)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                if problems:
                    print(f"[speed_fast] warning: using checkpoint {tag} of {run_dir}; {len(problems)} newer one(s) "
                          f"are unusable: {'; '.join(problems)}", file=sys.stderr)
                return loaded
        return load_for_inference(run_dir, ema=ema, device=device, checkpoint=checkpoint)
    except (RuntimeError, TypeError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{run_dir}: the {'EMA' if ema else 'model'} weights do not load into the run's model "
                         f"({type(exc).__name__}: {reason[:500]})") from None


def load_run(run_dir: str, ema: bool, device):
    """(model in eval mode, NoiseSchedule, data meta) of a run (or of a checkpoint directory inside
    one), through `speed_fast.training.checkpoint.load_for_inference` (newest complete checkpoint)."""
    from .training.checkpoint import STATE_FILE

    if not os.path.isdir(run_dir):
        raise ValueError(f"--ckpt {run_dir}: no such run directory")
    is_checkpoint = os.path.isfile(os.path.join(run_dir, STATE_FILE))  # a checkpoint directory inside a run
    checkpoint = os.path.abspath(run_dir) if is_checkpoint else None
    model, _config, schedule, meta = load_checked(run_dir_of(run_dir), ema, device, checkpoint)
    return model, schedule, meta


class _Autocast(torch.nn.Module):
    """The model's forward pass under autocast (bf16); its output back in float32, so guidance and
    the sampler's arithmetic stay fp32."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x, t, *cond):
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.model(x, t, *cond)
        return out.float()


class RunSampler:
    """A run's model, ready to draw any chunk of one seeded sample set (speed_fast.sampling.sample
    with first_index): `draw(start, k)` gives samples start .. start + k - 1 as images (decoded by
    the VAE for runs on latents), float32 on the CPU, and their labels. A chunk's values depend on
    its start and size only, not on which process draws it or what it drew before.

    precision "bf16" runs the model's forward pass under bf16 autocast; compile=True puts it
    through torch.compile; cfg_channels guides only the first cfg_channels eps channels (None: all;
    3 reproduces DiT's forward_with_cfg on 4-channel latents).

    A text-to-image run needs `prompts` (module docstring); its chunks' labels are the prompts' indices."""

    def __init__(self, run_dir: str, *, ema: bool = False, steps="250", method: str = "ddpm", eta: float = 0.0,
                 cfg: float = 1.0, cfg_channels: int | None = None, seed: int = 0, labels: str | None = None,
                 device=None, vae: str | None = None, clip_denoised: bool = False, precision: str = "fp32",
                 compile: bool = False, batch_size: int = 64, prompts: list[str] | None = None,
                 text_encoder: str | None = None):
        from .vae import check_vae_matches, load_vae

        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        model, self.schedule, meta = load_run(run_dir, ema, self.device)
        self.prompts = self.encoder = self.null = None
        self.truncated = 0
        if is_text_model(model.config):
            self._text(run_dir, model.config, meta, prompts, text_encoder, labels)
        elif prompts is not None or text_encoder is not None:
            raise ValueError(f"--prompt/--prompts/--text-encoder: {run_dir} is class-conditional "
                             f"({model.num_classes} classes); pick classes with --labels")
        channels = int(model.in_channels)
        if channels not in (1, 3) and vae is None:
            raise ValueError(f"{run_dir} was trained on {channels}-channel latents {meta.get('shape')}; "
                             "pass --vae (the VAE that encoded them: a hub id, ema/mse, a directory or a .safetensors file) to decode them")
        if cfg_channels is not None and cfg_channels > channels:
            raise ValueError(f"--cfg-channels {cfg_channels}: {run_dir} has {channels}-channel data")
        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model = model  # fp32 weights; what the state hash (speed_fast.sampling_job) reads
        net = model
        if compile:
            net = torch.compile(net, dynamic=False)
        if precision == "bf16":
            net = _Autocast(net, torch.bfloat16)
        self.net = net
        self.decoder = load_vae(vae, self.device) if vae is not None else None
        if self.decoder is not None:
            check_vae_matches(self.decoder, meta, f"the data of {run_dir}")
        self.num_classes = None if self.prompts is not None else int(model.num_classes)
        self.shape = (channels, int(model.input_size), int(model.input_size))
        self.learn_sigma = bool(model.config.learn_sigma)
        self.options = dict(steps=steps, method=method, eta=eta, cfg_scale=cfg, seed=seed,
                            clip_denoised=clip_denoised, guided_channels=cfg_channels)
        self.labels, self.cfg, self.batch_size = labels, cfg, batch_size

    def _text(self, run_dir: str, config, meta: dict, prompts, text_encoder, labels) -> None:
        """A text-to-image run's prompts, text encoder and null caption, checked against the model."""
        from .data import null_text
        from .text import load_text_encoder

        if labels is not None:
            raise ValueError(f"--labels {labels!r}: {run_dir} is a text-to-image run; it samples from --prompt or "
                             "--prompts")
        if not prompts:
            raise ValueError(f"{run_dir} is a text-to-image run: pass --prompt TEXT (repeatable) or --prompts FILE")
        text = meta.get("text") or {}
        name = text_encoder if text_encoder is not None else text.get("encoder")
        flag = "--text-encoder" if text_encoder is not None else \
            f"the text encoder of {run_dir} (its data's sidecar; pass --text-encoder for another)"
        self.encoder = load_text_encoder(name, device=self.device, flag=flag)
        if self.encoder.width != config.text_width:
            raise ValueError(f"{flag} {name!r} embeds captions with width {self.encoder.width}, but the model of "
                             f"{run_dir} has text_width {config.text_width}")
        if self.encoder.max_tokens != text.get("tokens"):
            raise ValueError(f"{flag} {name!r} gives {self.encoder.max_tokens} tokens a caption, the run's data "
                             f"{text.get('tokens')} (its null caption is guidance's unconditional branch)")
        self.prompts = list(prompts)
        self.truncated = sum(len(ids) > self.encoder.max_tokens for ids in self.encoder.tokenize(self.prompts))
        self.null = null_text(meta)  # float16 (L, D), (D,): exactly what caption dropout trained on

    def prompt_text(self, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens fp32 [k, L, D], pooled fp32 [k, D], prompt indices int64 [k]) of samples start .. start + k - 1:
        prompt i mod P, embedded in one batch and rounded to float16 as the training data stores it."""
        idx = torch.tensor([(start + i) % len(self.prompts) for i in range(k)], dtype=torch.int64)
        tokens, pooled, _ = self.encoder.encode([self.prompts[i] for i in idx.tolist()])
        tokens, pooled = tokens.half(), pooled.half()
        null = torch.tensor([self.prompts[i] == "" for i in idx.tolist()])
        if null.any():  # the null caption: the data's stored bits, not a re-encoding
            tokens[null], pooled[null] = self.null[0].to(tokens), self.null[1].to(pooled)
        return tokens.float(), pooled.float(), idx

    def draw(self, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 [k, C, H, W] on the CPU, labels int64 [k]) of samples start .. start + k - 1 (a
        text-to-image run: the prompts' indices as labels). ValueError when a sample is not finite (e.g. a
        huge guidance scale)."""
        from .sampling import sample
        from .vae import decode_latents

        if self.prompts is not None:
            tokens, pooled, idx = self.prompt_text(start, k)
            cond = dict(text=(tokens, pooled), null_text=self.null)
        else:
            cond = dict(y=parse_labels(self.labels, k, start))
        x, y = sample(self.net, self.schedule, k, **cond, device=self.device,
                      batch_size=k, num_classes=self.num_classes, shape=self.shape, learn_sigma=self.learn_sigma,
                      return_labels=True, first_index=start, **self.options)  # (k, C, H, W)
        if self.prompts is not None:
            y = idx
        bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
        if bad:
            raise ValueError(f"{bad} of {k} samples are not finite (NaN or infinity) with --cfg {self.cfg:g}, --steps "
                             f"{self.options['steps']} ({self.options['method']}), in the batch from sample {start}; "
                             "nothing was written")
        if self.decoder is not None:
            x = decode_latents(self.decoder, x)
        return x, y


def generate(run_dir: str, n: int, *, ema: bool = False, steps="250", method: str = "ddpm", eta: float = 0.0,
             cfg: float = 1.0, seed: int = 0, labels: str | None = None, batch_size: int = 64, device=None,
             vae: str | None = None, clip_denoised: bool = False, cfg_channels: int | None = None,
             precision: str = "fp32", compile: bool = False, return_labels: bool = False,
             prompts: list[str] | None = None, text_encoder: str | None = None):
    """n samples of the run at `run_dir` (float32 [n, C, H, W] on the CPU), decoded to images when
    `vae` (a local AutoencoderKL directory) is given, drawn in chunks of `batch_size` consecutive
    samples (RunSampler; a text-to-image run needs `prompts`, sample i taking prompt i mod P). Raises
    ValueError when any sample is not finite (e.g. a huge guidance scale)."""
    sampler = RunSampler(run_dir, ema=ema, steps=steps, method=method, eta=eta, cfg=cfg, cfg_channels=cfg_channels,
                         seed=seed, labels=labels, device=device, vae=vae, clip_denoised=clip_denoised,
                         precision=precision, compile=compile, batch_size=batch_size, prompts=prompts,
                         text_encoder=text_encoder)
    xs, ys = [], []
    for start in range(0, n, batch_size):
        x, y = sampler.draw(start, min(batch_size, n - start))
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if return_labels else x


MAX_GRID_IMAGES = 1024  # a grid PNG shows at most the first 1024 samples (32 x 32 tiles); the .npz holds all
