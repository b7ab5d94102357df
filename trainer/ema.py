"""EMA of the weights under ZeRO-1/2/3, without ever gathering the model to update it.

Each rank averages only the weights it owns, in float32:

    ZeRO-3     its own partition of every parameter (`param.ds_tensor`, a flat slice), as
               DeepSpeed laid them out: rank r holds elements [r*n, (r+1)*n) of the flattened
               parameter, padded at the end;
    ZeRO-0/1/2 every rank holds full parameters, so parameters are dealt out to ranks (greedy by
               size, a function of the model and world size only) and each rank averages its own.

So EMA memory per rank is 4 bytes x params / world, and an update is a local `lerp_`, no
communication. Only `export()` gathers (every rank calls it; rank 0 gets the full state dict).
The per-rank state goes into each checkpoint (`state_dict()` / `load_state_dict()`), restored
bit-exactly on resume with the same world size.

The EMA follows the module's working weights: with bf16 training those are the bf16 copies of
DeepSpeed's fp32 masters (rounding noise of 2^-8 per update that the average itself smooths out).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from trainer.callbacks import Callback


def compute_ema_decay(updates: int, decay: float) -> float:
    """Decay for update number `updates` (0-based): min(decay, (1 + n) / (10 + n)), diffusers'
    EMAModel default, so the early average is not dominated by the random initial weights."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def compute_ema(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], decay: float):
    """In place: ema <- decay * ema + (1 - decay) * weights (float32), for every key of `ema`."""
    if not ema:
        return
    with torch.no_grad():  # one fused call over all tensors, not a Python loop per parameter
        torch._foreach_lerp_(
            list(ema.values()), [weights[n].detach().float() for n in ema], 1.0 - decay
        )


def deal_params(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: largest first to the least-loaded rank (ties: lower rank)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


class ShardedEma(Callback):
    """A stateful loop callback (trainer/callbacks.py): `on_engines`, `on_step_end`, its state in
    every checkpoint; `export()` for the exported weights."""

    name = "ema"
    stateful = True

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ldm.ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module: nn.Module | None = None
        self.rank, self.world = 0, 1
        self.owner: dict[str, int] = {}  # ZeRO-0/1/2: parameter name -> owning rank
        self.shadow: dict[str, torch.Tensor] = {}  # this rank's float32 averages

    # -- loop events --------------------------------------------------------------------------
    def on_engines(self, engines: dict, rank: int, world: int) -> None:
        """Start the average from the initial weights (before any step or resume)."""
        self.module = next(iter(engines.values())).module
        self.rank, self.world = rank, world
        params = list(self.module.named_parameters())
        owners = deal_params([p.numel() for _, p in params], world)
        self.owner = {n: r for (n, p), r in zip(params, owners, strict=True) if not _partitioned(p)}
        self.shadow = {n: w.float().clone() for n, w in self._local_weights().items()}

    def on_step_end(self, engines: dict, step: int) -> None:
        compute_ema(self.shadow, self._local_weights(), compute_ema_decay(self.updates, self.decay))
        self.updates += 1

    def _local_weights(self) -> dict[str, torch.Tensor]:
        """The tensors this rank averages: ZeRO-3 partitions, or the full params it owns."""
        out = {}
        for n, p in self.module.named_parameters():
            if _partitioned(p):
                out[n] = p.ds_tensor.data.reshape(-1)
            elif self.owner[n] == self.rank:
                out[n] = p.data
        return out

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        meta = torch.tensor([self.updates, self.world], dtype=torch.int64)
        return {"__meta__": meta, **{n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        updates, world = (int(v) for v in state["__meta__"].tolist())
        if world != self.world:
            raise ValueError(
                f"{source}: the EMA was saved by {world} workers, this run has {self.world}: "
                f"resume with scaling.num_workers={world}"
            )
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"{source}: EMA state lacks {missing[0]!r}")
        for n, t in self.shadow.items():
            t.copy_(state[n])
        self.updates = updates

    # -- export -------------------------------------------------------------------------------
    def export(self) -> dict[str, torch.Tensor] | None:
        """Full float32 EMA weights on rank 0, None elsewhere. A collective: every rank calls it.
        Tensors handed to torch.distributed live on the parameters' device (NCCL: CUDA only)."""
        distributed = dist.is_available() and dist.is_initialized() and self.world > 1
        full = {}
        for n, p in self.module.named_parameters():
            if _partitioned(p):
                local = self.shadow[n]  # (partition,) on the parameter's device
                if distributed:
                    parts = [torch.empty_like(local) for _ in range(self.world)]
                    dist.all_gather(parts, local)
                    local = torch.cat(parts)
                full[n] = local[: p.ds_numel].reshape(p.ds_shape)
            else:
                owner = self.owner[n]
                t = self.shadow[n] if owner == self.rank else torch.empty(
                    p.shape, dtype=torch.float32, device=p.device
                )
                if distributed:
                    dist.broadcast(t, src=owner)
                full[n] = t
        if self.rank != 0:
            return None
        return {n: t.detach().cpu().float().contiguous().clone() for n, t in full.items()}
