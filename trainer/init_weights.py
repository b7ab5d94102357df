"""Initial weights from a file, loaded into a module as the engine builds it — under ZeRO-3's
`zero.Init` too, where each rank holds only its shard of every parameter.

    load_into(model, "sd/unet/diffusion_pytorch_model.safetensors", prefix="unet.")

Tensors are read lazily (safetensors `safe_open`, or a weights-only memory-mapped `torch.load`),
one module at a time. Partitioned (ZeRO-3) parameters are gathered per module with
`deepspeed.zero.GatheredParameters(modifier_rank=0)`: rank 0 reads and writes the module's values,
DeepSpeed re-partitions them to every rank on exit, and no rank ever holds the whole model beyond
one module's parameters. Without partitioning every rank copies the values into its own full
model. Names and shapes are checked first (`check_names`), so a mismatch is one error naming the
file and the first name, raised alike on every rank.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from trainer.pretrained.weights import LazyTensors, check_names


def full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> full shape of every parameter and persistent buffer (ZeRO-3: `ds_shape`)."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = tuple(getattr(t, "ds_shape", None) or t.shape)
    return out


def _partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def load_into(model: nn.Module, path: str, *, prefix: str = "") -> None:
    """Copy the weights file `path` into `model`'s entries named `prefix + name`, strictly."""
    tensors = LazyTensors(path)
    check_names(full_shapes(model), tensors, prefix)
    zero3 = _partitioned(model)
    rank = 0
    if zero3:
        import deepspeed
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
    for mod_name, module in model.named_modules():
        local = {**dict(module.named_parameters(recurse=False)),
                 **dict(module.named_buffers(recurse=False))}  # fmt: skip
        if not local:
            continue
        base = f"{mod_name}." if mod_name else ""
        params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        ctx = (deepspeed.zero.GatheredParameters(params, modifier_rank=0)
               if zero3 and params else contextlib.nullcontext())  # fmt: skip
        with ctx:
            for name, t in local.items():
                full = base + name
                if not full.startswith(prefix) or full[len(prefix) :] not in tensors.names():
                    continue  # a non-persistent buffer
                if hasattr(t, "ds_id") and rank != 0:
                    continue  # rank 0 writes, DeepSpeed re-partitions to every rank
                t.data.copy_(tensors.get(full[len(prefix) :]).to(t.dtype))
