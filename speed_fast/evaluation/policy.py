"""The one sampling setting of every quality evaluation: which sampler, and whether x0 is clipped.

Used by the trainer's --eval-every, `speed-fast eval` of a run and the convergence benchmark, so
that they all measure the same thing.
"""

from __future__ import annotations

import os

from ..jsonfile import read_json_object


#: The evaluator's sampler: DDIM over 25 respaced steps (eta 0). On pixel data the predicted x0
#: is clipped to [-1, 1] at every step: without it, eps errors at high t (amplified by
#: 1/sqrt(abar_t), ~150 at t = 960 on the linear schedule) let a few percent of an undertrained
#: model's samples diverge, and the Fréchet distance of one checkpoint then swung 8x between
#: sample seeds; with clipping it stays within a few percent (tests/test_evaluation.py).
EVAL_SAMPLER = "ddim25"
SPACES = ("pixels", "latents")


def data_space(meta: dict) -> str:
    """"pixels" or "latents" for a data file's meta: its "space" entry (top level, or under "source"
    where `write_latents(extra=...)` puts provenance) when it has one, else pixels for 1 or 3 channels
    (images in [-1, 1]) and latents otherwise (e.g. 4-channel VAE latents)."""
    source = meta.get("source")
    space = meta.get("space", source.get("space") if isinstance(source, dict) else None)
    if space is not None:
        if space not in SPACES:
            raise ValueError(f"data meta 'space' must be one of {SPACES}, got {space!r}")
        return space
    return "pixels" if int(meta["shape"][0]) in (1, 3) else "latents"


def sampler_method(steps) -> str:
    """The sampler a respacing spec names: "ddim" for "ddimN", DDPM (ancestral, learned sigma) otherwise."""
    return "ddim" if isinstance(steps, str) and steps.startswith("ddim") else "ddpm"


def eval_sampling(meta: dict, steps=EVAL_SAMPLER, clip_denoised: bool | None = None) -> dict:
    """The sampling settings of every quality evaluation (trainer's --eval-every, `speed-fast eval` of a
    run, the convergence benchmark): {"steps", "method", "clip_denoised"}. clip_denoised=None means
    clip on pixel data, not on latents (their range is not bounded)."""
    clip = data_space(meta) == "pixels" if clip_denoised is None else bool(clip_denoised)
    return {"steps": steps, "method": sampler_method(steps), "clip_denoised": clip}


def run_eval_sampling(run_dir: str, steps=None, clip_denoised: bool | None = None, what: str = "--gen") -> dict:
    """`eval_sampling` of a run directory: its evaluator's sampler (--eval-sampler, --eval-clip in its
    config.json) unless `steps` / `clip_denoised` are given. `what` names the run in errors."""
    try:
        config = read_json_object(os.path.join(run_dir, "config.json"))
        train, meta = config["train"], config["data_meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{what} {run_dir!r}: not a run directory with a readable config.json "
                         f"({type(exc).__name__}: {exc})") from None
    return eval_sampling(meta, steps or train.get("eval_sampler", EVAL_SAMPLER),
                         train.get("eval_clip") if clip_denoised is None else clip_denoised)
