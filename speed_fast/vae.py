"""The VAE and the latent convention: the one owner of how images become latents and back.

* Which VAE: a diffusers AutoencoderKL from a local directory (save_pretrained layout: config.json
  + weights), e.g. sd-vae-ft-ema for DiT. Nothing is ever downloaded.
* The convention (DiT's, and `speed-fast encode`'s): a stored latent is
  `(z - shift_factor) * scaling_factor`, both from the VAE's own config (shift_factor absent or
  null: 0), z the posterior mean (or one posterior sample). Decoding undoes it:
  `z = latent / scaling_factor + shift_factor`.
* The latent format: the .beton of speed_fast.data (bf16 latents, docs/CONTRACT.md "File formats").
"""

from __future__ import annotations

import os

import torch


def load_vae(path: str, device, flag: str = "--vae"):
    """A diffusers AutoencoderKL from a local directory, in eval mode on `device`; never downloads."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {path!r} must be a local directory holding an AutoencoderKL saved with "
                         "save_pretrained (a diffusers AutoencoderKL directory: config.json + weights); nothing is "
                         "downloaded at run time (e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema "
                         "--local-dir DIR` beforehand)")
    from diffusers.models import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag} {path!r}: could not load an AutoencoderKL from it ({exc})") from None
    return vae.to(device).eval()


def latent_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE's config (shift 0 when it has none)."""
    shift = vae.config.get("shift_factor", None)
    return float(vae.config.scaling_factor), 0.0 if shift is None else float(shift)


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
