"""Device-honest collectives: the one place training code reduces values across ranks.

NCCL reduces CUDA tensors only ("Tensors must be CUDA and dense"); gloo takes CPU tensors. So
every tensor handed to `torch.distributed` lives on the engine's device (`engine.device`: the
rank's GPU, or the CPU), and every rank hands the same dtype. Python scalars (flags, counters)
are reduced through `_dist_reduce`, which puts them on the device the caller names, as
torchtitan's `dist_max` / `dist_mean` do through their one `_dist_reduce`.

Without an initialized process group (a single process, unit tests) the helpers return their
input: one rank's sum or minimum is itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SUM, MIN, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """The device the default process group reduces on, for callers that hold no engine: the
    current CUDA device when the group has an NCCL backend, else the CPU."""
    if distributed() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dist_reduce(
    x: torch.Tensor | float, op: dist.ReduceOp, device: torch.device | str
) -> torch.Tensor:
    """All-reduce the elements of `x` (a tensor of any shape, or a Python number) on `device`.

    The value travels as float64 on every rank (dtypes agree whatever the caller's precision; a
    bf16 loss becomes exact there). Returns the reduced (N,) tensor on `device`: `.item()` of a
    one-element result is a single device-to-host copy."""
    if isinstance(x, torch.Tensor):
        t = x.detach().reshape(-1).to(device=device, dtype=torch.float64)
    else:
        t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t, op=op)
    return t


def dist_sum(x: torch.Tensor | float, device: torch.device | str) -> float:
    """Sum of one value over the ranks (a collective: every rank calls it)."""
    return float(_dist_reduce(x, SUM, device).sum().item())


def dist_max(x: torch.Tensor | float, device: torch.device | str) -> float:
    return float(_dist_reduce(x, MAX, device).max().item())


def dist_broadcast(x: torch.Tensor, device: torch.device | str, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values of `x` (any shape and dtype; the same on every rank), on every rank (a
    collective). The copy handed to torch lives on `device` whatever device `x` is on (a module's
    parameters before DeepSpeed moves them are on the CPU); returns that (N,) copy."""
    t = x.detach().reshape(-1).to(device=device, copy=True)
    if distributed():
        dist.broadcast(t, src=src)
    return t


def all_ranks_true(flag: bool | torch.Tensor, device: torch.device | str) -> bool:
    """True when `flag` holds on every rank (a collective). A tensor flag stays where it is
    computed (on `device`); no host round trip before the reduction."""
    if isinstance(flag, torch.Tensor):
        flag = flag.to(dtype=torch.bool).all()
    return bool(_dist_reduce(flag, MIN, device).min().item() == 1.0)


def all_ranks_finite(values: torch.Tensor, device: torch.device | str) -> bool:
    """True when every element of `values` is finite on every rank."""
    return all_ranks_true(torch.isfinite(values.detach().to(device)).all(), device)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (a collective). torch picks the payload's
    device from the group's backend (the current CUDA device under NCCL)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (a collective). torch picks the payload's
    device from the group's backend (the current CUDA device under NCCL)."""
    if not distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
