"""Triton GPU kernels of the fused SpeeD step, imported as `speed_fast.kernels` (contract:
docs/CONTRACT.md; a leaf below speed_fast.ops: nothing here imports speed_fast.ops or above)."""
