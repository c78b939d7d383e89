"""Exponential moving average of the weights, kept where ZeRO keeps the fp32 master weights.

Each rank averages only the fp32 values its optimizer partition owns, so the EMA costs no
communication per step and is consistent under every ZeRO stage:

* ZeRO-3: the rank's partition of each parameter (`safe_get_local_fp32_param`): a flat slice
  [r * P, (r + 1) * P) of the padded parameter, P = ceil(numel / world).
* ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fp32 fragment of the parameter that lives in
  this rank's flat partition (`param._hp_mapping`: offset and length in the flattened parameter).
* ZeRO-0 in fp32: the parameter itself, identical on every rank.

`full_state_dict()` (a collective: every rank calls it) reassembles full fp32 tensors on one
rank (rank 0 by default; every rank's host holding a copy of a 5.4 GB model would not do), and
`load_full_state_dict()` cuts a full state back into this rank's pieces, so a checkpoint's EMA
is a plain state dict, independent of the stage and world size that wrote it. The same pieces
give the full fp32 master weights (`full_master_state_dict`), which is how checkpoints store
the model for inference.

Warm-up (`warmup=True`): the n-th update (n = 0, 1, ...) uses decay min(d, (1 + n) / (10 + n)), so
early in a run the average follows the weights instead of holding on to the random
initialisation (at d = 0.99 without it, the initial weights still make up 55% of the EMA after
60 steps). `num_updates` is the count of applied updates; the trainer restores it on resume
(steps minus skipped steps), so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _Piece:
    """Where one parameter's locally owned fp32 values are: `kind` full | fragment | shard."""

    __slots__ = ("name", "param", "kind", "start", "numel")

    def __init__(self, name, param, kind, start, numel):
        self.name, self.param, self.kind, self.start, self.numel = name, param, kind, start, numel


def _pieces(module: torch.nn.Module) -> list[_Piece]:
    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter
            out.append(_Piece(name, p, "shard", 0, p.ds_tensor.ds_numel))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2 or bf16 optimizer: fragment of the flat partition
            m = p._hp_mapping
            start, numel = (m.lp_fragment_address.start, m.lp_fragment_address.numel) if m is not None else (0, 0)
            out.append(_Piece(name, p, "fragment", start, numel))
        else:
            out.append(_Piece(name, p, "full", 0, p.numel()))
    return out


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_id") else p.shape


def _full_numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if hasattr(p, "ds_id") else p.numel()


class ShardedEMA:
    """EMA of the fp32 master weights of `module` (the engine's module, after deepspeed.initialize)."""

    def __init__(self, module: torch.nn.Module, decay: float, group=None, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        if not isinstance(warmup, bool):
            raise ValueError(f"EMA warmup must be a bool, got {warmup!r}")
        self.module = module
        self.decay = float(decay)
        self.warmup = warmup
        self.group = group
        self.refresh()
        self.shadow = [s.detach().clone().float() for s in self._sources()]  # EMA starts at the weights
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        self._updates = torch.zeros((), dtype=torch.float64, device=device)  # exact counts up to 2^53

    def refresh(self) -> None:
        """Re-read where the master weights live (after deepspeed's load_checkpoint)."""
        self.pieces = _pieces(self.module)

    def _source(self, piece: _Piece) -> torch.Tensor:
        p = piece.param
        if piece.kind == "shard":
            return p._z3_optimizer.get_local_fp32_param(p).detach().view(-1)
        if piece.kind == "fragment":
            if p._hp_mapping is None:
                return torch.empty(0, dtype=torch.float32, device=p.device)
            return p._hp_mapping.hp_fragment.detach().view(-1)
        return p.detach().view(-1)

    def _sources(self) -> list[torch.Tensor]:
        return [self._source(piece) for piece in self.pieces]

    def _decay(self, device) -> torch.Tensor:
        """The decay of the next update as a float32 device scalar (computed there: no host copy)."""
        decay = torch.full((), self.decay, dtype=torch.float32, device=device)  # a fill, not a host copy
        if self.warmup:
            n = self._updates.to(device=device, dtype=torch.float32)
            decay = torch.minimum(decay, (1.0 + n) / (10.0 + n))
        return decay

    def current_decay(self) -> float:
        """The decay the next update uses (d, or the warm-up's smaller value early on); reads the device."""
        return float(self._decay(self._updates.device))

    @property
    def num_updates(self) -> int:
        """Updates applied so far (a host read of the device counter: for checkpoints and tests)."""
        return int(self._updates)

    @num_updates.setter
    def num_updates(self, n: int) -> None:
        self._updates.fill_(int(n))

    @torch.no_grad()
    def update(self, skip: torch.Tensor | None = None) -> None:
        """shadow = d * shadow + (1 - d) * weights (DiT's update, d = decay or its warm-up value), on the
        local pieces.

        skip: a bool device scalar; where it is set d = 1 and the EMA stays as it was (the step's
        update was cancelled, and it does not count as an update), decided on the device without a
        host read."""
        src = [s.float() for s in self._sources()]
        if not self.shadow:
            return
        device = self.shadow[0].device
        decay = self._decay(device)
        if skip is not None:
            decay = torch.where(skip.reshape(()), 1.0, decay)
        torch._foreach_mul_(self.shadow, decay)
        torch._foreach_add_(self.shadow, torch._foreach_mul(src, 1.0 - decay))
        self._updates += 1 if skip is None else (~skip.reshape(())).to(self._updates.dtype)

    # ---- full tensors ------------------------------------------------------------------------

    def _ranks(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def _assemble(self, piece: _Piece, local: torch.Tensor, dst: int | None) -> torch.Tensor | None:
        """The full fp32 tensor of one parameter from every rank's local piece (collective): on every
        rank when `dst` is None, else on rank `dst` of the group only (None on the others)."""
        p = piece.param
        rank, world = self._ranks()
        mine = dst is None or rank == dst
        if world > 1 and dst is not None:
            root = dst if self.group is None else dist.get_global_rank(self.group, dst)
        if piece.kind == "full":
            return local.view(p.shape).clone() if mine else None
        if piece.kind == "fragment":
            buf = torch.zeros(p.numel(), dtype=torch.float32, device=local.device)
            buf.narrow(0, piece.start, piece.numel).copy_(local)
            if world > 1:  # fragments are disjoint: their sum assembles the tensor
                if dst is None:
                    dist.all_reduce(buf, group=self.group)
                else:
                    dist.reduce(buf, dst=root, group=self.group)
            return buf.view(p.shape) if mine else None
        local = local.contiguous()
        if world == 1:
            parts = [local]
        elif dst is None:
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local, group=self.group)
        else:
            parts = [torch.empty_like(local) for _ in range(world)] if mine else None
            dist.gather(local, parts, dst=root, group=self.group)
        return torch.cat(parts)[: _full_numel(p)].view(_full_shape(p)) if mine else None

    def _local_piece(self, piece: _Piece, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full tensor (the inverse of _assemble)."""
        p = piece.param
        if tuple(full.shape) != tuple(_full_shape(p)):
            raise ValueError(f"EMA tensor {piece.name} has shape {tuple(full.shape)}, the model's is "
                             f"{tuple(_full_shape(p))}")
        flat = full.reshape(-1).float()
        if piece.kind == "full":
            return flat.clone()
        if piece.kind == "fragment":
            return flat.narrow(0, piece.start, piece.numel).clone()
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        size = piece.numel
        padded = torch.zeros(size * (rank + 1), dtype=torch.float32)
        n = min(flat.numel(), padded.numel())
        padded[:n] = flat[:n]
        return padded[rank * size:(rank + 1) * size].clone()

    def _gather(self, tensors: list[torch.Tensor], dst: int | None, device) -> dict[str, torch.Tensor]:
        out = {}
        for piece, local in zip(self.pieces, tensors):
            full = self._assemble(piece, local.float(), dst)
            if full is not None:
                out[piece.name] = full.to(device)
        return out

    def full_state_dict(self, dst: int | None = 0, device="cpu") -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} of the EMA, on `device` (collective: every rank calls it). Only
        rank `dst` gets it ({} on the others), so a checkpoint holds one host copy, not one per
        rank; dst=None gives it to every rank (e.g. on the training device, for evaluation)."""
        return self._gather(self.shadow, dst, device)

    def full_master_state_dict(self, dst: int | None = 0, device="cpu") -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor} of the current master weights (collective; as full_state_dict)."""
        return self._gather(self._sources(), dst, device)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = [piece.name for piece in self.pieces]
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for i, piece in enumerate(self.pieces):
            self.shadow[i] = self._local_piece(piece, state[piece.name]).to(self.shadow[i].device)
