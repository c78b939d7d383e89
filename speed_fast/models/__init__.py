"""Models trained by speed_fast (single-device code; DeepSpeed wraps them from outside), and
checkpoint interop with facebookresearch/DiT (`interop.py`)."""

from .dit import DiT, DiTConfig, flops_per_image
from .interop import dit_model_name, from_dit_state_dict, load_dit_state_dict, to_dit_state_dict

__all__ = ["DiT", "DiTConfig", "flops_per_image", "load_dit_state_dict", "to_dit_state_dict", "from_dit_state_dict",
           "dit_model_name"]
