"""Models trained by speed_fast (single-device code; DeepSpeed wraps them from outside)."""

from .dit import DiT, DiTConfig, flops_per_image

__all__ = ["DiT", "DiTConfig", "flops_per_image"]
