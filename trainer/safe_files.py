"""File formats that run no code when read: the two ways checkpoints and exports are loaded.

DeepSpeed's engine state is pickled, and DeepSpeed 0.19 loads it with
`torch.load(weights_only=False)`, which runs whatever a pickle says. `check_weights_only` loads
every such file once with `torch.load(weights_only=True)` and an explicit allow-list of the few
DeepSpeed types its ZeRO 0-3 state holds (`deepspeed_safe_globals`) before DeepSpeed sees it; a
file that needs anything else is refused (`UnsafeCheckpointError`) and nothing in it runs.

Exported weights are safetensors, written with a canonical header (`safetensors_bytes`): the same
weights and metadata give the same bytes, so fingerprints of identical weights agree.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that a weights-only load refuses: it would run code if unpickled."""


def deepspeed_safe_globals() -> list:
    """The non-torch types in DeepSpeed 0.19's checkpoint state, beyond torch's own weights-only
    set. Found by saving tiny ZeRO-0/1/2/3 checkpoints (fp32 and bf16, torch AdamW) and listing
    `torch.serialization.get_unsafe_globals_in_checkpoint`: the ZeRO optimizer state holds its
    stage enum, its loss scaler and (ZeRO-1/2) fragment addresses; the model state holds none.
    `DynamicLossScaler` is what fp16 runs hold in the same place. All are plain data classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_weights_only(path: str, name: str) -> None:
    """Load `path` with `torch.load(weights_only=True)` plus `deepspeed_safe_globals()`; raise
    UnsafeCheckpointError naming `name` if it needs anything else. Zip-format files are memory-
    mapped, so the check reads the pickle, not the tensor data."""

    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise UnsafeCheckpointError(
            f"{name}: refusing to load: it needs more than tensors and the allowed DeepSpeed "
            f"types (would run code if unpickled): {reason[0] if reason else type(e).__name__}"
        ) from None
    except (
        RuntimeError,
        EOFError,
        IndexError,
        KeyError,
        ValueError,
        AttributeError,
        struct.error,
    ) as e:
        # A damaged file can fail inside the unpickler in many ways: all mean "unreadable", which
        # resume treats like any other bad checkpoint (it skips it), never as a crash.
        raise ValueError(f"{name}: not a readable torch file: {type(e).__name__}: {e}") from None


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save` with a canonical header: same tensors and metadata, same bytes.

    safetensors keeps `metadata` in a Rust HashMap, whose order is random per map, so two saves
    of identical weights differ in their header (and fingerprint) once there are two metadata
    keys. We rewrite the JSON header with sorted keys and no spaces, padded to 8 bytes as
    safetensors pads it; the tensor data and its offsets are untouched."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    canon = {}
    if "__metadata__" in header:
        canon["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    canon.update(sorted(header.items()))
    text = json.dumps(canon, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `safetensors_bytes(tensors, metadata)` to the local file `path`."""
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))
