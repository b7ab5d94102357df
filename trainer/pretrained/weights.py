"""Reading weight files without running code: safetensors, or `torch.load(weights_only=True)`
for the `.bin` / `.pt` / `.ckpt` files other tools write (a pickle that names any code is refused,
never unpickled)."""

from __future__ import annotations

import io
import pickle
import re

import torch

from data_pipeline import fs
from trainer.models.image_tokenizer import name_mismatch

# A diffusers model folder's weights, in the order diffusers itself prefers them.
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_weights(
    data: bytes,
    uri: str,
    *,
    hint: str = "save its state dict as .safetensors",
    unwrap: str | None = None,
) -> dict[str, torch.Tensor]:
    """A state dict from the bytes of `uri`: safetensors by its name, else a weights-only
    `torch.load` (a ValueError naming the file, the pickled global it refused and `hint`: what
    to do instead). `unwrap`: the key a checkpoint may nest its state dict under (Lightning's
    "state_dict")."""
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"{uri}: not a valid safetensors file: {e}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL_RE.search(str(e))
        name = found.group(1) if found else str(e).splitlines()[0]
        raise ValueError(
            f"{uri}: the file pickles {name}, and we never unpickle code ({hint})"
        ) from None
    if unwrap is not None and isinstance(obj, dict) and unwrap in obj:
        obj = obj[unwrap]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def find_weights(folder: fs.Location, *, what: str) -> fs.Location:
    """The weights file of a diffusers model folder (safetensors preferred over .bin); a
    FileNotFoundError naming the folder and the names looked for."""
    for name in DIFFUSERS_WEIGHT_NAMES:
        if fs.exists(folder.join(name)):
            return folder.join(name)
    raise FileNotFoundError(
        f"{folder.join(DIFFUSERS_WEIGHT_NAMES[0]).uri}: missing ({what} weights: expected "
        f"{' or '.join(DIFFUSERS_WEIGHT_NAMES)})"
    )


class LazyTensors:
    """name -> tensor of a weights file, read on access."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            self._st = safe_open(path, framework="pt", device="cpu")
            self._names = list(self._st.keys())
            self._shapes = {n: tuple(self._st.get_slice(n).get_shape()) for n in self._names}
        else:  # .bin: mmap, weights only (a pickle naming code is refused)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # not a zip-format file (mmap needs one): read it whole
                with open(path, "rb") as f:
                    sd = load_weights(f.read(), path)
            self._st, self._sd = None, sd
            self._names = list(sd)
            self._shapes = {n: tuple(v.shape) for n, v in sd.items()}

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return self._st.get_tensor(name) if self._st is not None else self._sd[name]


def check_names(expected: dict[str, tuple[int, ...]], tensors: LazyTensors, prefix: str) -> None:
    """ValueError naming the file and the first missing/unexpected name or wrong shape."""
    want = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
    mismatch = name_mismatch(want, tensors.names())
    if mismatch:
        raise ValueError(f"{tensors.path}: weights do not match the model: {mismatch}")
    for k, shape in want.items():
        if tensors.shape(k) != shape:
            raise ValueError(
                f"{tensors.path}: {k!r} has shape {tensors.shape(k)}, the model expects {shape}"
            )
