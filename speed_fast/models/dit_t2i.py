"""A text-conditioned DiT (PixArt-alpha style): DiT's blocks with a cross-attention to the caption.

The model maps (x_t [B, C, H, W], t int64 [B], tokens [B, L, D_text], pooled [B, D_text]) to
[B, 2C, H, W] (eps and the learned-variance interpolation v, as DiT) or [B, C, H, W] without learned
sigma. tokens / pooled are a CLIP text model's `last_hidden_state` and `pooler_output` (what a
captioned .beton stores, speed_fast.data); the model knows nothing about noise or about how the
caption was dropped: the trainer swaps a dropped sample's tokens and pooled for the null caption's
("" encoded), and classifier-free guidance (speed_fast.sampling) calls it with them.

    cfg = DiTT2IConfig.named("dit-t2i-xl2", input_size=32, in_channels=4, text_width=768)
    model = DiTT2I(cfg)
    out = model(x_t, t, tokens, pooled)

The block (DiT's adaLN-Zero block with PixArt-alpha's cross-attention between its two halves):

    c      = t_embed(t) + W_pool pooled                                   # (B, D): replaces DiT's class embedding
    ctx    = W_text tokens                                                # (B, L, D): one linear D_text -> D
    s1, a1, g1, s2, a2, g2 = adaLN(c)                                     # DiT's six modulations, zero-initialised
    x = x + g1 * SelfAttn(LN(x) * (1 + a1) + s1)
    x = x + CrossAttn(q = LN(x), k = v = ctx)                             # output projection zero-initialised
    x = x + g2 * MLP(LN(x) * (1 + a2) + s2)

LN is LayerNorm without affine parameters. The cross-attention is not gated by c (as PixArt-alpha);
unlike PixArt-alpha its queries are the LayerNorm-ed stream, as the two modulated branches read it.
Its output projection starts at zero, so at initialisation a block computes exactly DiT's block on
c (`tests/test_t2i.py::test_zero_initialised_cross_attention_is_ditblock`), and the whole model
starts at output 0 like DiT. Patch embedding, fixed 2-D sin-cos positions, the final adaLN layer,
learned sigma and the initialisation are DiT's (speed_fast.models.dit); attention goes through SDPA,
or xformers when asked for, as there.

Named sizes (`T2I_SIZES`; the data fixes input size, channels and the text width):

* `dit-t2i-s2`: digits and CI (4 blocks, hidden 128, 4 heads, patch 2: the digits preset's DiT).
* `dit-t2i-xl2`: DiT-XL/2's sizes (28 blocks, hidden 1152, 16 heads, patch 2), the paper's Tab. 5
  text-to-image model on 256px SD-VAE latents with CLIP ViT-L/14's text model (D_text = 768).
* `dit-t2i-custom`: every size from the run's `t2i` settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dit import (ATTN_BACKENDS, Attention, FinalLayer, Mlp, TimestepEmbedder, _xformers_ops, modulate,
                  sincos_pos_embed_2d)

# name -> (depth, hidden size, heads, patch size)
T2I_SIZES = {
    "dit-t2i-s2": (4, 128, 4, 2),
    "dit-t2i-xl2": (28, 1152, 16, 2),
}
T2I_SIZE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")
T2I_CUSTOM = "dit-t2i-custom"


@dataclass
class DiTT2IConfig:
    input_size: int = 32          # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_width: int = 768         # D_text: the width of the caption's token and pooled embeddings
    learn_sigma: bool = True
    grad_checkpointing: bool = False
    attn_backend: str = "auto"

    @classmethod
    def named(cls, name: str, **overrides) -> "DiTT2IConfig":
        """The config of a named size ("dit-t2i-s2", "dit-t2i-xl2"), with other fields overridden."""
        if name not in T2I_SIZES:
            raise ValueError(f"text-to-image model must be one of {list(T2I_SIZES)} or {T2I_CUSTOM!r}, got {name!r}")
        clash = sorted(set(overrides) & set(T2I_SIZE_KEYS))
        if clash:
            raise ValueError(f"{name} fixes {clash}; give them with model {T2I_CUSTOM!r} instead")
        depth, hidden, heads, patch = T2I_SIZES[name]
        return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **overrides)

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "text_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTT2IConfig.{name} must be a positive integer, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTT2IConfig.input_size ({self.input_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            raise ValueError(f"DiTT2IConfig.hidden_size ({self.hidden_size}) must be a multiple of 4 and of num_heads "
                             f"({self.num_heads}) with an even head size (2D sin-cos position embedding)")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"DiTT2IConfig.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to the caption tokens (keys, values)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        L, H = ctx.shape[1], self.num_heads
        q = self.q(x).view(B, N, H, D // H)  # (B, N, H, Dh)
        k, v = self.kv(ctx).view(B, L, 2, H, D // H).unbind(2)  # (B, L, H, Dh) each
        if self.backend == "xformers":
            if x.device.type != "cuda":
                raise ValueError(f"attn_backend 'xformers' needs CUDA tensors, got device {x.device}")
            out = _xformers_ops().memory_efficient_attention(q, k, v)  # (B, N, H, Dh)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2)).transpose(1, 2)  # (B, N, H, Dh)
        return self.proj(out.reshape(B, N, D))


class DiTT2IBlock(nn.Module):
    """DiT's adaLN-Zero block with a cross-attention to the caption between its halves (module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), c (B, D), ctx (B, L, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm_cross(x), ctx)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiTT2I(nn.Module):
    def __init__(self, config: DiTT2IConfig):
        super().__init__()
        self.config = c = config
        self.input_size = c.input_size
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.text_width = c.text_width
        self.grad_checkpointing = c.grad_checkpointing
        self.x_embedder = nn.Conv2d(c.in_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.pooled_embedder = nn.Linear(c.text_width, c.hidden_size)
        self.text_embedder = nn.Linear(c.text_width, c.hidden_size)
        pos = torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, c.input_size // c.patch_size)).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, N, D), as DiT
        self.blocks = nn.ModuleList(
            [DiTT2IBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.attn_backend) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init (xavier linears, zero biases, N(0, 0.02) for the t-embedding MLP and, in place of
        the class table, the pooled projection; zero adaLN modulations and output layer), and a zero
        output projection of every cross-attention, so every block starts as DiT's."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.pooled_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for layer in (block.adaLN_modulation[-1], block.cross_attn.proj):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, C = self.patch_size, self.out_channels
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t int64 (B,), tokens (B, L, D_text), pooled (B, D_text) -> (B, C_out, H, W)."""
        if tokens.shape[-1] != self.text_width or pooled.shape[-1] != self.text_width:
            raise ValueError(f"text embeddings of width {tokens.shape[-1]} (tokens) / {pooled.shape[-1]} (pooled); "
                             f"this model's text_width is {self.text_width}")
        dtype = self.text_embedder.weight.dtype
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D): fp32 stream as DiT
        c = self.t_embedder(t) + self.pooled_embedder(pooled.to(dtype))  # (B, D)
        ctx = self.text_embedder(tokens.to(dtype))  # (B, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, ctx, use_reentrant=False)
            else:
                x = block(x, c, ctx)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return self.unpatchify(x)  # (B, C_out, H, W)
