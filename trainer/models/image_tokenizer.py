"""The image-tokenizer interface: dVAE and VQGAN (discrete codes), KL-AE (latents).

`ImageTokenizer` is the base class of `DvaeTokenizer`, `VqganTokenizer` and `KlaeTokenizer`:
`encode` images float32 (B, 3, H, W) in [0, 1] (H and W multiples of `downsample`) into int64
codes (B, H/f, W/f) in [0, vocab_size) or, for the KL autoencoder, latents (B, C, H/f, W/f)
already multiplied by `scaling_factor`; `decode` goes back to [0, 1]. `load_strict` is the strict
state-dict load every tokenizer uses. Loading a tokenizer from a directory (`model.safetensors` +
`config.yaml`, the names below) and converting ecosystem weights live in `trainer/tokenizers.py`.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHTS = "model.safetensors"  # a tokenizer directory: the weights
CONFIG = "config.yaml"  # ... and the `t2i train` config naming the kind and its shape


def load_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str, layout: str
) -> None:
    """`load_state_dict(strict=True)` with an error naming the first missing/unexpected key (in
    the module's own order) or the first shape mismatch, instead of torch's wall of keys.
    `what` names the source (a file, a run), `layout` the expected one ("dVAE", "VQGAN", ...)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            parts.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
        raise ValueError(
            f"{what}: state dict does not match the {layout} layout: {'; '.join(parts)}"
        )
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{what}: {k!r} has shape {tuple(state_dict[k].shape)}, the layout expects "
                f"{tuple(v.shape)}"
            )
    module.load_state_dict(state_dict, strict=True)


class ImageTokenizer(nn.Module):
    """Base of the image tokenizers: `encode` images in [0, 1], `decode` back to [0, 1]."""

    kind: str = ""  # "dvae" | "vqgan" | "klae" (the training objective's name)
    discrete: bool = True  # codes (dVAE, VQGAN) or continuous latents (KL-AE)
    downsample: int = 8  # image side / code-grid side
    vocab_size: int = 0  # discrete: codebook size K
    latent_channels: int = 0  # continuous: C of the latents
    scaling_factor: float = 1.0  # continuous: latents are multiplied by it after encoding
    fingerprint: str = ""  # sha256 of the weights file it was loaded from

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, image_size: int) -> int:
        """Side of the code grid (or latent) for square images of `image_size`."""
        if image_size % self.downsample:
            raise ValueError(
                f"image size {image_size} is not a multiple of the {self.kind} "
                f"downsampling factor {self.downsample}"
            )
        return image_size // self.downsample

    def describe(self) -> dict:
        """What a dataset manifest records about the tokenizer that produced it."""
        out = {"kind": self.kind, "fingerprint": self.fingerprint, "downsample": self.downsample}
        if self.discrete:
            out["vocab_size"] = self.vocab_size
        else:
            out.update(latent_channels=self.latent_channels, scaling_factor=self.scaling_factor)
        return out
