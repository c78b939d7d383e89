"""The DeepSpeed engine of a run: the model (a DiT or a U-Net, speed_fast.models.registry), an AdamW whose step can be cancelled, deepspeed.initialize.

    engine, optimizer = build_engine(plan, device)

Every rank builds the same initial weights (seeded with the run's seed, or read from a
facebookresearch/DiT checkpoint with --init-from) before ZeRO partitions them; the optimizer is a torch AdamW that ZeRO wraps (DeepSpeed's own optimizers are not used,
so the update is the same under every stage).
"""

from __future__ import annotations

import torch

from ..models.interop import load_dit_state_dict
from ..models.registry import build_model, probe_model_attention
from .config import Plan


class SkippableAdamW(torch.optim.AdamW):
    """torch's fused AdamW (CUDA and CPU) whose step can be cancelled on the device.

    `skip_if(flag)` hands the optimizer a device scalar (1: cancel, 0: apply) that its next step()
    reads inside the fused kernel, as torch's GradScaler does with `found_inf`: a cancelled step
    leaves weights, moments and the step count bitwise unchanged, and the host never reads the
    flag. ZeRO wraps this optimizer and calls its step() on the fp32 partitions."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)

    def skip_if(self, flag: torch.Tensor) -> None:
        self.found_inf = flag.float().reshape(())  # read by torch.optim.AdamW.step (fused path)


def build_engine(plan: Plan, device: torch.device, init: bool = True):
    """(DeepSpeed engine, the optimizer it wraps) for `plan`, on `device` (collective: every rank).
    init=False skips --init-from (a resumed run's weights come from its checkpoint)."""
    import deepspeed

    cfg = plan.cfg
    probe_model_attention(plan.model, device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(plan.model)
    if cfg.init_from is not None and init:
        # Memory-mapped: the ranks of a node share the file's pages instead of each reading a copy.
        load_dit_state_dict(model, torch.load(cfg.init_from, map_location="cpu", weights_only=True, mmap=True))
    model = model.to(device)  # before the optimizer: fused AdamW checks its params' device
    optimizer = SkippableAdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                               weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=plan.ds_config)
    if plan.compile:
        # The whole forward as one graph where DeepSpeed adds no hooks to it (ZeRO-3 gathers
        # weights in module hooks, which break the graph). The SpeeD ops outside the model are
        # single kernels already (custom ops, traceable but with nothing left to fuse).
        stage = plan.ds_config["zero_optimization"]["stage"]
        engine.compile(compile_kwargs={"fullgraph": stage < 3})
    return engine, optimizer
