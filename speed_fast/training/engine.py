"""The DeepSpeed engine of a run: the DiT, an AdamW whose step can be cancelled, deepspeed.initialize.

    engine, optimizer = build_engine(plan, device)

Every rank builds the same initial weights (seeded with the run's seed) before ZeRO partitions
them; the optimizer is a torch AdamW that ZeRO wraps (DeepSpeed's own optimizers are not used,
so the update is the same under every stage).
"""

from __future__ import annotations

import torch

from ..models.dit import DiT
from .config import Plan


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next step() can be cancelled: the trainer sets `skip_next` on every rank
    when any rank saw a non-finite loss, so no rank applies NaN gradients (ZeRO wraps this
    optimizer and calls its step() on the fp32 partitions)."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


def build_engine(plan: Plan, device: torch.device):
    """(DeepSpeed engine, the optimizer it wraps) for `plan`, on `device` (collective: every rank)."""
    import deepspeed

    cfg = plan.cfg
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DiT(plan.dit).to(device)  # before the optimizer: fused CUDA AdamW checks its params' device
    optimizer = SkippableAdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                               weight_decay=cfg.weight_decay, **({"fused": True} if plan.use_cuda else {}))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.ds_config)
    if cfg.compile:
        engine.compile()
    return engine, optimizer
