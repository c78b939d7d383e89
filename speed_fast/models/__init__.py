"""Models trained by speed_fast (single-device code; DeepSpeed wraps them from outside): the DiT
(`dit.py`), the text-to-image DiT (`dit_t2i.py`), the diffusers-based U-Net (`unet.py`), the name -> family
registry (`registry.py`) and checkpoint interop with facebookresearch/DiT (`interop.py`)."""

from .dit import DiT, DiTConfig, flops_per_image
from .dit_t2i import T2I_SIZES, DiTT2I, DiTT2IConfig
from .interop import dit_model_name, from_dit_state_dict, load_dit_state_dict, to_dit_state_dict
from .registry import build_model, family_of, is_text_model, model_config, model_names, run_model_config
from .unet import UNET_SIZES, UNet, UNetConfig

__all__ = ["DiT", "DiTConfig", "flops_per_image", "load_dit_state_dict", "to_dit_state_dict", "from_dit_state_dict",
           "dit_model_name", "UNet", "UNetConfig", "UNET_SIZES", "build_model", "family_of", "model_config",
           "model_names", "run_model_config", "DiTT2I", "DiTT2IConfig", "T2I_SIZES", "is_text_model"]
