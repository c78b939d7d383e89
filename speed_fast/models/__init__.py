"""Models trained by speed_fast (single-device code; DeepSpeed wraps them from outside): the DiT
(`dit.py`), the diffusers-based U-Net (`unet.py`), the name -> family registry (`registry.py`) and
checkpoint interop with facebookresearch/DiT (`interop.py`)."""

from .dit import DiT, DiTConfig, flops_per_image
from .interop import dit_model_name, from_dit_state_dict, load_dit_state_dict, to_dit_state_dict
from .registry import build_model, family_of, model_config, model_names, run_model_config
from .unet import UNET_SIZES, UNet, UNetConfig

__all__ = ["DiT", "DiTConfig", "flops_per_image", "load_dit_state_dict", "to_dit_state_dict", "from_dit_state_dict",
           "dit_model_name", "UNet", "UNetConfig", "UNET_SIZES", "build_model", "family_of", "model_config",
           "model_names", "run_model_config"]
