"""speed_fast: SpeeD time-step sampling and change-aware weighting for diffusion transformers,
with fused kernels (Triton on GPU, C++ on CPU) and a DeepSpeed trainer."""

__version__ = "0.1.0"
