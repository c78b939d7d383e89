"""DiT: the diffusion transformer of Peebles & Xie (2023), as single-device torch code.

The model maps (x_t [B, C, H, W], t int64 [B], y int64 [B]) to [B, 2C, H, W] (eps and
the learned-variance interpolation v) or [B, C, H, W] without learned sigma. It
knows nothing about noise schedules: `speed_fast.diffusion` turns its output into
losses and samples. Parallelism (DeepSpeed ZeRO) is applied from outside.

    cfg = DiTConfig.named("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    model = DiT(cfg)

Architecture (DiT paper, Sec. 3): patchify -> N blocks of adaLN-Zero (LayerNorm whose
shift/scale come from the time + class embedding, and a gate initialised to zero so
each block starts as the identity) -> a final adaLN layer initialised to zero ->
unpatchify. Class conditioning has one extra "null" class (index num_classes) that
label dropout substitutes; classifier-free guidance (`speed_fast.sampling`) calls the
model with it.
Attention goes through torch SDPA ("auto" and "sdpa"), or through xformers' memory-efficient
attention only when asked for ("xformers", CUDA only); `probe_attention` makes one real call of
the chosen backend at start-up, so a missing or mismatched xformers wheel fails before training
with a message saying so, not at the first step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (depth, hidden size, heads); patch sizes 2, 4, 8 for each (DiT paper, Table 1).
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
ATTN_BACKENDS = ("auto", "sdpa", "xformers")


@dataclass
class DiTConfig:
    input_size: int = 32          # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    grad_checkpointing: bool = False
    attn_backend: str = "auto"

    @classmethod
    def named(cls, name: str, **overrides) -> "DiTConfig":
        """The config of a family member, e.g. "DiT-XL/2", with other fields overridden."""
        try:
            size, patch = name.removeprefix("DiT-").split("/")
            depth, hidden, heads = DIT_SIZES[size]
            patch = int(patch)
            if patch not in PATCH_SIZES:
                raise KeyError(patch)
        except (KeyError, ValueError):
            names = [f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES]
            raise ValueError(f"model must be one of {names}, got {name!r}") from None
        return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **overrides)

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive integer, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.input_size ({self.input_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size ({self.hidden_size}) must be a multiple of 4 with an even "
                             f"head size (2D sin-cos position embedding)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"DiTConfig.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with per-sample shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256) -> MLP -> hidden."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[B] -> [B, dim]: cos and sin of t at geometrically spaced frequencies (fp32)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t, self.frequency_embedding_size)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> hidden; index num_classes is the null class that label dropout substitutes."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels int64 [B]; drop bool [B] (True -> null class). Without `drop`, labels are dropped
        at random with dropout_prob in training mode (callers that need reproducible runs pass it)."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None:
            if self.dropout_prob == 0:
                raise ValueError("label dropout needs class_dropout_prob > 0 (the model has no null class)")
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (B, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads
        qkv = self.qkv(x).view(B, N, 3, H, D // H)  # (B, N, 3, H, Dh)
        if self.backend == "xformers":
            if x.device.type != "cuda":
                raise ValueError(f"attn_backend 'xformers' needs CUDA tensors, got device {x.device}")
            q, k, v = qkv.unbind(2)  # (B, N, H, Dh) each
            out = _xformers_ops().memory_efficient_attention(q, k, v)  # (B, N, H, Dh)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, N, H, Dh)
        return self.proj(out.reshape(B, N, D))


_XFORMERS_OPS: list = []  # xformers.ops once imported (a traced forward then only reads this list)


def _xformers_ops():
    if not _XFORMERS_OPS:
        try:
            import xformers.ops as xops
        except ImportError as exc:
            raise ValueError(f"attn_backend 'xformers' requested but xformers cannot be imported ({exc}); install "
                             "a wheel built for this torch, or use the default SDPA attention") from None
        _XFORMERS_OPS.append(xops)
    return _XFORMERS_OPS[0]


def probe_attention(backend: str, device, head_dim: int = 64, dtype=torch.bfloat16, attention=None) -> None:
    """One real attention call of `backend` on `device`, checked against SDPA; raises ValueError with
    the reason when it cannot run (no CUDA, xformers missing, a wheel built for another torch or
    GPU, wrong results). SDPA ("auto", "sdpa") needs no probe. `attention(q, k, v)` replaces the
    backend's function (tests)."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    if backend != "xformers":
        return
    device = torch.device(device)
    if attention is None:
        if device.type != "cuda":
            raise ValueError(f"attn_backend 'xformers' needs a CUDA device, got {device}")
        xops = _xformers_ops()
        attention = xops.memory_efficient_attention
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2, head_dim, generator=g).to(device, dtype) for _ in range(3))  # (B, N, H, Dh)
    import importlib.metadata

    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    where = f"xformers {version}, torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}"
    try:
        out = attention(q, k, v).float()
    except Exception as exc:  # a wheel for another torch/GPU fails in many ways; name it, whatever it is
        raise ValueError(f"attn_backend 'xformers' does not run here ({where}): {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}; install a wheel built for this torch "
                         "or use the default SDPA attention") from exc
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    err = (out - ref).abs().max().item()
    if not err <= 2e-2:
        raise ValueError(f"attn_backend 'xformers' gives wrong results here ({where}): max |out - SDPA| = {err:.3g}")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms, and residual gates, are set by c (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, N, D), c (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """[grid*grid, dim] fixed 2-D sin-cos position embedding: half the channels encode the
    column, half the row, each as sin/cos at geometrically spaced frequencies (float64)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, d)

    col, row = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="xy")
    # Tokens are row-major (row * grid + col); DiT puts the column's half first.
    return np.concatenate([one_axis(dim // 2, col), one_axis(dim // 2, row)], axis=1)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.input_size = c.input_size
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.num_classes = c.num_classes
        self.grad_checkpointing = c.grad_checkpointing
        self.x_embedder = nn.Conv2d(c.in_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        # Fixed (not learned) and recomputable: a buffer, so optimisers, EMA and ZeRO never see it.
        pos = torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, c.input_size // c.patch_size)).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, N, D)
        self.blocks = nn.ModuleList(
            [DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.attn_backend) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zero biases, N(0, 0.02) embeddings, and zero adaLN
        modulations and output layer, so every block starts as the identity and the output as 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, C = self.patch_size, self.out_channels
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t int64 (B,), y int64 (B,), drop bool (B,) or None -> (B, C_out, H, W)."""
        x = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D)
        # The residual stream takes pos_embed's dtype: fp32 under bf16 autocast (the patch embedding
        # gives bf16, fp32 + bf16 is fp32, and every block adds its bf16 update to an fp32 stream).
        x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, drop)  # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return self.unpatchify(x)  # (B, C_out, H, W)


def flops_per_image(config: DiTConfig) -> dict:
    """Forward multiply-adds per image (DiT's convention: 118.6 G for XL/2 at 256px) and the
    training FLOPs per image (fwd + bwd = 3x forward, 2 FLOPs per multiply-add)."""
    N, D, L = config.num_patches, config.hidden_size, config.depth
    p2c = config.patch_size ** 2
    hidden = int(D * config.mlp_ratio)
    per_block = N * (3 * D * D + D * D + 2 * D * hidden) + 2 * N * N * D + 6 * D * D
    macs = L * per_block + N * p2c * config.in_channels * D + N * D * p2c * config.out_channels + 2 * D * D
    return {"forward_gmacs": macs / 1e9, "train_gflops": 6 * macs / 1e9}
