"""Triton GPU kernels of the fused SpeeD step, imported as `speed_fast.kernels` (see DESIGN.md)."""
