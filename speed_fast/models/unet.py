"""A class-conditional LDM-style U-Net for the trainer, built on diffusers' `UNet2DModel`.

The model keeps DiT's contract, so the trainer, the fused SpeeD step, the variational-bound loss,
the samplers, guidance and label dropout use it unchanged:

    model(x_t [B, C, H, W], t int64 [B], y int64 [B], drop bool [B] | None) -> [B, 2C, H, W]

(eps and the learned-variance interpolation v; [B, C, H, W] without learned sigma). Class labels
index an embedding table of num_classes + 1 rows (`UNet2DModel(num_class_embeds=...)`, added to
the time embedding): row num_classes is the null class that label dropout substitutes where
`drop` is True and that classifier-free guidance (`speed_fast.sampling`) calls the model with,
as `speed_fast.models.dit.LabelEmbedder` does (no extra row when class_dropout_prob is 0). Unlike
DiT's embedder the U-Net never drops labels on its own: the trainer decides `drop` from
(seed, micro-step) (`speed_fast.training.label_dropout`).

    cfg = UNetConfig.named("unet-ldm", input_size=32, in_channels=4, num_classes=1000)
    model = UNet(cfg)

Layout (`UNet2DModel`): conv_in, one down block per entry of `channel_mult` (width base_channels x
mult, `layers_per_block` ResNet blocks, attention after each where the level is in
`attention_levels`, a stride-2 conv down-sampling after every block but the last), a middle block
(ResNet, attention, ResNet), the mirrored up blocks (layers_per_block + 1 ResNet blocks each, on the
skip connections), GroupNorm, SiLU, conv_out. Time: sinusoidal features (cos first) of the base
width, an MLP to 4 x base width; the class embedding is added to it and every ResNet block adds a
projection of the sum. Attention has one head unless `attention_head_dim` is set (diffusers fixes
the head width, not the head count). As in LDM/ADM's U-Net, the last convolution of every ResNet
block, every attention output projection and conv_out start at zero, so each block starts as its
skip path and the model's output as 0 (DiT's adaLN-Zero plays that role there).

Named sizes (`UNET_SIZES`; the data fixes input size, channels and classes):

* `unet-ldm`: the paper's Tab. 7 U-Net (32x32 input, base width 128, one attention head, depth 8).
  "Depth 8" is read as the U-Net's 8 resolution blocks: 4 down blocks and 4 up blocks of
  UNet2DModel (32, 16, 8, 4 at a 32x32 input), with the authors' released UNet-32 settings (channel
  multipliers 1, 2, 2, 1; 3 ResNet blocks per down block, 4 per up block; attention at 16x16 and in
  the middle). The table says 3 input channels, the authors' code builds 4 (SD-VAE latents): here
  the data decides (3 on pixels, 4 on SD-VAE latents).
* `unet-cifar10`: DDPM's CIFAR-10 U-Net (Ho et al. 2020: base 128, multipliers 1, 2, 2, 2, 2 ResNet
  blocks, attention at 16x16; its dropout 0.1 is the cifar10-unet preset's).
* `unet-small`: digits and CI (8x8: base 32, multipliers 1, 2, 1 ResNet block, attention at 4x4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# name -> the fields a size fixes; everything else (dropout, class dropout, learned sigma) stays free.
UNET_SIZES = {
    "unet-small": dict(base_channels=32, channel_mult=(1, 2), layers_per_block=1, attention_levels=(1,),
                       attention_head_dim=None, norm_groups=8),
    "unet-cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), layers_per_block=2, attention_levels=(1,),
                         attention_head_dim=None, norm_groups=32),
    "unet-ldm": dict(base_channels=128, channel_mult=(1, 2, 2, 1), layers_per_block=3, attention_levels=(1,),
                     attention_head_dim=None, norm_groups=32),
}
UNET_SIZE_KEYS = ("base_channels", "channel_mult", "layers_per_block", "attention_levels", "attention_head_dim",
                  "norm_groups")
UNET_CUSTOM = "unet-custom"  # every field from the run's `unet` settings


@dataclass
class UNetConfig:
    input_size: int = 32            # height = width of the inputs
    in_channels: int = 4
    base_channels: int = 128        # width of the first level; level i has base_channels x channel_mult[i]
    channel_mult: tuple = (1, 2, 2, 1)
    layers_per_block: int = 3       # ResNet blocks per down block (up blocks have one more)
    attention_levels: tuple = (1,)  # levels (0 = full resolution) with self-attention; the middle always has it
    attention_head_dim: int | None = None  # None: one head per attention layer (Tab. 7)
    norm_groups: int = 32
    dropout: float = 0.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    grad_checkpointing: bool = False

    @classmethod
    def named(cls, name: str, **overrides) -> "UNetConfig":
        """The config of a named size ("unet-ldm", ...), with other fields overridden."""
        if name not in UNET_SIZES:
            raise ValueError(f"U-Net model must be one of {list(UNET_SIZES)} or {UNET_CUSTOM!r}, got {name!r}")
        clash = sorted(set(overrides) & set(UNET_SIZE_KEYS))
        if clash:
            raise ValueError(f"{name} fixes {clash}; give them with model {UNET_CUSTOM!r} instead")
        return cls(**UNET_SIZES[name], **overrides)

    def __post_init__(self):
        for name in ("input_size", "in_channels", "base_channels", "layers_per_block", "norm_groups", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if not self.channel_mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                            for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be positive integers, one per level, got "
                             f"{self.channel_mult!r}")
        levels = len(self.channel_mult)
        if not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < levels for a in self.attention_levels):
            raise ValueError(f"UNetConfig.attention_levels must be level indices in [0, {levels - 1}], got "
                             f"{self.attention_levels!r}")
        factor = 2 ** (levels - 1)
        if self.input_size % factor:
            raise ValueError(f"input size {self.input_size} does not fit this U-Net's down-sampling: {levels} levels "
                             f"halve it {levels - 1} times, so it must be a multiple of {factor}")
        for width in self.widths:
            if width % self.norm_groups:
                raise ValueError(f"UNetConfig: level width {width} is not divisible by norm_groups "
                                 f"{self.norm_groups} (GroupNorm)")
            head = self.attention_head_dim
            if head is not None and (isinstance(head, bool) or not isinstance(head, int) or head < 1 or width % head):
                raise ValueError(f"UNetConfig.attention_head_dim must be a positive integer dividing every level "
                                 f"width {self.widths}, got {head!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"UNetConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")

    @property
    def widths(self) -> tuple:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"], d["attention_levels"] = list(self.channel_mult), list(self.attention_levels)
        return d


class UNet(nn.Module):
    """`UNet2DModel` behind DiT's calling convention (see the module docstring)."""

    def __init__(self, config: UNetConfig):
        from diffusers import UNet2DModel

        super().__init__()
        self.config = c = config
        self.input_size, self.in_channels, self.out_channels = c.input_size, c.in_channels, c.out_channels
        self.num_classes = c.num_classes
        self.learn_sigma = c.learn_sigma
        levels = range(len(c.channel_mult))
        self.unet = UNet2DModel(
            sample_size=c.input_size, in_channels=c.in_channels, out_channels=c.out_channels,
            time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
            down_block_types=tuple("AttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels),
            up_block_types=tuple("AttnUpBlock2D" if i in c.attention_levels else "UpBlock2D"
                                 for i in reversed(levels)),
            block_out_channels=c.widths, layers_per_block=c.layers_per_block, attention_head_dim=c.attention_head_dim,
            norm_num_groups=c.norm_groups, dropout=c.dropout, add_attention=True,
            num_class_embeds=c.num_classes + int(c.class_dropout_prob > 0))
        if c.grad_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """diffusers' initialisation, then LDM/ADM's zeros: each ResNet block's last convolution, each
        attention output projection and the output convolution."""
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        zero = [self.unet.conv_out]
        for m in self.unet.modules():
            if isinstance(m, ResnetBlock2D):
                zero.append(m.conv2)
            elif isinstance(m, Attention):
                zero.append(m.to_out[0])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t int64 (B,), y int64 (B,), drop bool (B,) or None -> (B, C_out, H, W)."""
        if drop is not None:
            if self.config.class_dropout_prob == 0:
                raise ValueError("label dropout needs class_dropout_prob > 0 (the model has no null class)")
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)  # (B,)
        return self.unet(x, t, class_labels=y, return_dict=False)[0]  # (B, C_out, H, W)
