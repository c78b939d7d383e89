"""The fused ops of the SpeeD training step (one file per op) and `FusedSpeeD`, re-exported.

    t = sample_timesteps(prob, alias, n, seed, step)                   # sample_timesteps.py
    x_t = add_noise(x0, t, sqrt_ab, sqrt_1mab, seed, step)             # sample_and_noise.py
    t, x_t = sample_and_noise(x0, prob, alias, sqrt_ab, sqrt_1mab, seed, step)
    loss, mse = weighted_mse(pred, t, weights, seed, step)             # weighted_mse.py
    fused = FusedSpeeD(schedule, strategy, device, backend, seed)      # fused.py

Backends and their selection: backends.py; argument checks: validate.py. Contract: docs/CONTRACT.md.
"""

from .backends import BACKENDS, BackendUnavailable, available_backends, backend_status, resolve_backend
from .fused import FusedSpeeD
from .sample_and_noise import (AddNoiseFunction, SampleAndNoiseFunction, add_noise, add_noise_ref, noise_ref,
                               sample_and_noise, sample_and_noise_ref)
from .sample_timesteps import sample_timesteps, sample_timesteps_ref
from .validate import FLOAT_DTYPES
from .weighted_mse import WeightedMSEFunction, weighted_mse, weighted_mse_fwd_ref, weighted_mse_ref

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "AddNoiseFunction",
    "BackendUnavailable",
    "FusedSpeeD",
    "SampleAndNoiseFunction",
    "WeightedMSEFunction",
    "add_noise",
    "add_noise_ref",
    "available_backends",
    "backend_status",
    "noise_ref",
    "resolve_backend",
    "sample_and_noise",
    "sample_and_noise_ref",
    "sample_timesteps",
    "sample_timesteps_ref",
    "weighted_mse",
    "weighted_mse_fwd_ref",
    "weighted_mse_ref",
]
