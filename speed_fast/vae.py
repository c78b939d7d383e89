"""The VAE and the latent convention: the one owner of how images become latents and back.

* Which VAE (`--vae NAME`, `load_vae`): NAME is, in this order,
  - an existing local path: a directory in diffusers' save_pretrained layout (config.json +
    diffusion_pytorch_model.safetensors or .bin), or a single `.safetensors` file;
  - DiT's shorthands `ema` / `mse`: the hub ids stabilityai/sd-vae-ft-ema / stabilityai/sd-vae-ft-mse;
  - a Hugging Face hub id `org/name` (or `org/name/subfolder`, e.g. a pipeline's `vae` folder),
    resolved by huggingface_hub: config.json and the weights are downloaded on first use into the
    hub cache (`$HF_HUB_CACHE`, default ~/.cache/huggingface/hub) and read from there afterwards;
    with `HF_HUB_OFFLINE=1` nothing is downloaded and the cached snapshot of `main` is used.
  The class comes from the config's `_class_name`: AutoencoderKL or AutoencoderTiny.
* A single `.safetensors` file finds its config, offline, as `config.json` in the same folder (the
  file of a save_pretrained folder, or the VAE's config.json put next to it). Without one, an
  AutoencoderKL file goes through diffusers' single-file loader, which infers the model family
  from the weights' names and reads that family's VAE config from the hub (cached after first
  use, offline from the cache). Both diffusers-format and original (LDM / SD) weight names load
  as AutoencoderKL; an AutoencoderTiny file needs its config.json beside it and diffusers names.
* The convention (DiT's, and `speed-fast encode`'s): a stored latent is
  `(z - shift_factor) * scaling_factor`, both from the VAE's own config (shift_factor absent or
  null: 0). z is the posterior mean (or one posterior sample) of an AutoencoderKL, and the
  encoder output `latents` of an AutoencoderTiny. AutoencoderTiny's config also has
  `latent_magnitude` / `latent_shift`; those only map latents to [0, 1] for storing them as 8-bit
  images (its `forward`), they are not a diffusion normalisation and are not used here, exactly as
  diffusers' pipelines use only `scaling_factor` (1.0 for TAESD, whose latents are already on SD's
  scaled latent scale). Decoding undoes the convention: `z = latent / scaling_factor + shift_factor`.
* The latent format of a VAE (`latent_format`): class, latent channels, downsampling factor,
  scaling and shift factors. `speed-fast encode` records it, with the VAE's identity
  (`vae_record`), in the .beton sidecar under source.vae; `check_vae_matches` refuses decoding a
  run's samples with a VAE whose format differs from the run's data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch

# DiT's sample.py `--vae ema|mse` shorthands.
HUB_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_EXPECTED = ("a hub id (e.g. stabilityai/sd-vae-ft-ema, or DiT's ema / mse), a local AutoencoderKL directory "
             "(save_pretrained layout: config.json + weights) or a single .safetensors file")


def _config_class(config: dict, where: str, flag: str, name: str) -> str:
    cls = config.get("_class_name")
    if cls not in VAE_CLASSES:
        raise ValueError(f"{flag} {name!r}: {where} has _class_name {cls!r}; expected one of {list(VAE_CLASSES)}")
    return cls


def _read_config(path: str, flag: str, name: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag} {name!r}: {path} is not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {name!r}: {path} holds a {type(config).__name__}, expected a JSON object")
    return config


def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", "."))
            or name.endswith((".safetensors", ".json", ".bin", ".pt", ".ckpt")))


def resolve_vae(name: str, flag: str = "--vae") -> dict:
    """Where the VAE named `name` is on this machine (downloading a hub id into the hub cache on
    first use): {"name", "source": "directory" | "file" | "hub", "path" (the hub id for "hub"),
    "local" (the folder or file to load), "revision" (the hub commit, else None), "config"
    (the config.json used, or None for a single file whose config diffusers infers)}.
    ValueError (one line naming `name` and what was expected) when it cannot be found."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{flag} {name!r}: expected {_EXPECTED}")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"{flag} {name!r} is a directory without config.json; expected {_EXPECTED}")
        return {"name": name, "source": "directory", "path": os.path.abspath(path), "local": os.path.abspath(path),
                "revision": None, "config": config}
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{flag} {name!r} is a file but not a .safetensors file; expected {_EXPECTED}")
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        return {"name": name, "source": "file", "path": os.path.abspath(path), "local": os.path.abspath(path),
                "revision": None, "config": config if os.path.isfile(config) else None}
    hub_id = HUB_SHORTHANDS.get(name, name)
    parts = hub_id.split("/")
    if _looks_like_path(name) or len(parts) < 2 or not all(parts):
        raise ValueError(f"{flag} {name!r}: no such file or directory; expected {_EXPECTED}")
    return _resolve_hub(name, "/".join(parts[:2]), "/".join(parts[2:]) or None, flag)


def _resolve_hub(name: str, repo_id: str, subfolder: str | None, flag: str) -> dict:
    """config.json and the weights of a hub repo (folder), from the hub cache or downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, OfflineModeIsEnabled

    offline = constants.HF_HUB_OFFLINE
    where = f"{repo_id}{'/' + subfolder if subfolder else ''}"
    cache = constants.HF_HUB_CACHE
    hint = (f"not in the hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading it (run once without "
            "HF_HUB_OFFLINE, or pass a local directory / .safetensors file)" if offline else
            "check the name and your network (HF_HUB_OFFLINE=1 uses the hub cache only)")

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, local_files_only=offline)

    try:
        config = fetch("config.json")
        for i, weights in enumerate(WEIGHT_FILES):
            try:
                fetch(weights)
                break
            except EntryNotFoundError:
                if i == len(WEIGHT_FILES) - 1:
                    raise
    except HFValidationError as exc:
        raise ValueError(f"{flag} {name!r}: not a local path, and not a valid hub id ({exc}); "
                         f"expected {_EXPECTED}") from None
    except (EntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ValueError(f"{flag} {name!r}: no such local path, and the hub repository {where} is {hint} "
                         f"({type(exc).__name__}; files wanted: config.json and one of {list(WEIGHT_FILES)})") from None
    except OSError as exc:  # RepositoryNotFoundError, HTTP and connection errors are OSErrors
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"{flag} {name!r}: no such local path, and the hub repository {where} could not be "
                         f"read: {type(exc).__name__}: {reason}; {hint}") from None
    folder = os.path.dirname(config)
    snapshot = folder if subfolder is None else os.path.normpath(os.path.join(folder, *[".."] * len(subfolder.split("/"))))
    return {"name": name, "source": "hub", "path": where, "local": folder, "revision": os.path.basename(snapshot),
            "config": config}


def load_vae(name: str, device, flag: str = "--vae"):
    """The VAE named `name` (see the module docstring: local directory, .safetensors file, hub id or
    DiT's ema / mse) as a diffusers AutoencoderKL or AutoencoderTiny in eval mode on `device`.
    Its identity (`resolve_vae`'s answer) is kept on the module for `vae_record`.
    ValueError (one line naming `name`) when it cannot be found or loaded."""
    where = resolve_vae(name, flag)
    import diffusers

    try:
        if where["source"] == "file":
            vae = _load_file(where, flag)
        else:
            cls = _config_class(_read_config(where["config"], flag, name), where["config"], flag, name)
            vae = getattr(diffusers, cls).from_pretrained(where["local"], local_files_only=True,
                                                          low_cpu_mem_usage=False)
    except ValueError as exc:
        if str(exc).startswith(flag):
            raise
        raise ValueError(f"{flag} {name!r}: could not load the VAE from {where['local']} "
                         f"({' '.join(str(exc).split())[:500]})") from None
    except (OSError, RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"{flag} {name!r}: could not load the VAE from {where['local']} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:500]})") from None
    vae.speed_fast_source = where
    return vae.to(device).eval()


def _load_file(where: dict, flag: str):
    """A single .safetensors file: with its folder's config.json (offline), else diffusers' inferred config."""
    import diffusers
    from huggingface_hub import constants

    name, path = where["name"], where["local"]
    if where["config"] is None:  # diffusers infers the family and reads its config from the hub (cache)
        try:
            return diffusers.AutoencoderKL.from_single_file(path, local_files_only=constants.HF_HUB_OFFLINE,
                                                            low_cpu_mem_usage=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{flag} {name!r}: no config.json next to it, and diffusers' single-file loader could "
                             f"not get the config it infers ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                             f"put the VAE's config.json in {os.path.dirname(path)}") from None
    config = _read_config(where["config"], flag, name)
    cls = _config_class(config, where["config"], flag, name)
    if cls == "AutoencoderKL":  # diffusers converts original (LDM) weight names; its own names load as they are
        return diffusers.AutoencoderKL.from_single_file(path, config=os.path.dirname(where["config"]),
                                                        local_files_only=True, low_cpu_mem_usage=False)
    from safetensors.torch import load_file

    model = diffusers.AutoencoderTiny.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{flag} {name!r}: the weights do not fit the AutoencoderTiny of {where['config']} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); an AutoencoderTiny "
                         "file needs diffusers' weight names")
    return model


def downsampling_factor(vae) -> int:
    """Pixels per latent along each side: 2 per encoder stage after the first (diffusers' vae_scale_factor)."""
    cfg = vae.config
    blocks = cfg["encoder_block_out_channels"] if "encoder_block_out_channels" in cfg else cfg["block_out_channels"]
    return 2 ** (len(blocks) - 1)


def latent_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE's config (shift 0 when it has none)."""
    shift = vae.config.get("shift_factor", None)
    return float(vae.config.scaling_factor), 0.0 if shift is None else float(shift)


def latent_format(vae) -> dict:
    """What a latent of this VAE is: class, latent_channels, downsampling, scaling_factor, shift_factor."""
    scale, shift = latent_factors(vae)
    return {"class": type(vae).__name__, "latent_channels": int(vae.config.latent_channels),
            "downsampling": downsampling_factor(vae), "scaling_factor": scale, "shift_factor": shift}


def vae_record(vae) -> dict:
    """The VAE's identity and latent format, as `speed-fast encode` records it under the sidecar's
    source.vae: name (as given), source (directory | file | hub), path (absolute, or the hub id),
    revision (the hub commit), config_sha256 (of its config without diffusers' private keys) and
    latent_format's fields."""
    where = getattr(vae, "speed_fast_source", None) or {}
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": where.get("name"), "source": where.get("source"), "path": where.get("path"),
            "revision": where.get("revision"), "config_sha256": digest, **latent_format(vae)}


def data_latent_format(data_meta: dict) -> dict:
    """The latent format a data file's sidecar records: latent_channels (its shape), and, when it was
    written by `speed-fast encode`, the VAE's name, class, downsampling, scaling and shift factors
    (older sidecars: source.vae a path, source.scaling_factor / shift_factor)."""
    source = data_meta.get("source") if isinstance(data_meta.get("source"), dict) else {}
    vae = source.get("vae")
    rec = dict(vae) if isinstance(vae, dict) else {"name": vae} if isinstance(vae, str) else {}
    for key in ("scaling_factor", "shift_factor"):
        if key not in rec and key in source:
            rec[key] = source[key]
    shape = data_meta.get("shape") or [None]
    rec["latent_channels"] = shape[0]
    rec["space"] = source.get("space", data_meta.get("space"))
    return rec


def check_vae_matches(vae, data_meta: dict, data: str = "the run's data") -> None:
    """ValueError naming both sides when `vae` cannot decode the latents described by `data_meta`
    (a .beton sidecar, e.g. a run's config.json data_meta): its latent channels, and, when the
    sidecar records them (`speed-fast encode` does), downsampling, scaling and shift factors.
    Latents written by write-latents carry no VAE record: only their channels are checked."""
    want = data_latent_format(data_meta)
    have = latent_format(vae)
    name = (getattr(vae, "speed_fast_source", None) or {}).get("name", type(vae).__name__)
    if want.get("space") == "pixels":
        raise ValueError(f"--vae {name!r}: {data} are pixels (sidecar space: pixels), not latents; drop --vae")
    diffs = []
    for key in ("latent_channels", "downsampling", "scaling_factor", "shift_factor"):
        w = want.get(key)
        if w is None:
            continue
        if key in ("latent_channels", "downsampling"):
            same = int(w) == have[key]
        else:
            same = math.isclose(float(w), have[key], rel_tol=1e-6, abs_tol=1e-9)
        if not same:
            diffs.append(f"{key} {have[key]:g} vs {float(w):g}")
    if diffs:
        encoded = f", encoded with {want['name']!r}" if want.get("name") else ""
        raise ValueError(f"--vae {name!r} ({have['class']}) does not match the latents of {data}{encoded}: "
                         f"{', '.join(diffs)} (this VAE vs the data); pass the VAE the data was encoded with")


def posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, std) of images x in [-1, 1] (B, 3, H, W): an AutoencoderKL's posterior mean and standard
    deviation, an AutoencoderTiny's deterministic latents and None."""
    out = vae.encode(x)
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mean, out.latent_dist.std  # (B, C, h, w) each
    return out.latents, None


def to_latents(z: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """The stored latent of a VAE latent z: (z - shift) * scale."""
    return (z - shift) * scale


def from_latents(latents: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """The VAE latent z of a stored latent: latents / scale + shift."""
    return latents / scale + shift


def decode_latents(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU) from stored latents [N, C, h, w]."""
    device = next(vae.parameters()).device
    scale, shift = latent_factors(vae)
    out = []
    with torch.no_grad():
        for s in range(0, latents.shape[0], batch_size):
            z = from_latents(latents[s:s + batch_size].to(device=device, dtype=vae.dtype), scale, shift)
            out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)
