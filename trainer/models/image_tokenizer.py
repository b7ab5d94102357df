"""The image-tokenizer interface: dVAE and VQGAN (discrete codes), KL-AE (latents).

`ImageTokenizer` is the base class of `DvaeTokenizer`, `VqganTokenizer` and `KlaeTokenizer`:
`encode` images float32 (B, 3, H, W) in [0, 1] (H and W multiples of `downsample`) into int64
codes (B, H/f, W/f) in [0, vocab_size) or, for the KL autoencoder, latents (B, C, H/f, W/f)
already multiplied by `scaling_factor`; `decode` goes back to [0, 1]. `load_strict` is the strict
state-dict load every tokenizer uses; `compute_psnr` and `compute_code_usage` are the
reconstruction / codebook metrics the tokenizer objectives log. Loading a tokenizer from a directory (`model.safetensors` +
`config.yaml`, the names below) and converting ecosystem weights live in `trainer/pretrained/`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "model.safetensors"  # a tokenizer directory: the weights
CONFIG = "config.yaml"  # ... and the `t2i train` config naming the kind and its shape


def name_mismatch(expected, have) -> str | None:
    """The first missing name (in `expected`'s own order) and the first unexpected one of a
    weights file, with counts; None when the names are exactly `expected`."""
    have = set(have)
    missing = [k for k in expected if k not in have]
    unexpected = sorted(have.difference(expected))
    parts = []
    if missing:
        parts.append(f"missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        parts.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    return "; ".join(parts) or None


def load_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str, layout: str
) -> None:
    """`load_state_dict(strict=True)` with an error naming the first missing/unexpected key (in
    the module's own order) or the first shape mismatch, instead of torch's wall of keys.
    `what` names the source (a file, a run), `layout` the expected one ("dVAE", "VQGAN", ...)."""
    expected = module.state_dict()
    mismatch = name_mismatch(expected, state_dict)
    if mismatch:
        raise ValueError(f"{what}: state dict does not match the {layout} layout: {mismatch}")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{what}: {k!r} has shape {tuple(state_dict[k].shape)}, the layout expects "
                f"{tuple(v.shape)}"
            )
    module.load_state_dict(state_dict, strict=True)


def compute_psnr(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) of images in [0, 1], over the whole batch (fp32; the MSE
    is floored at 1e-10, so identical images give 100 dB, not inf)."""
    mse = F.mse_loss(recon.float(), images.float())
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def compute_code_usage(codes: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of the K codes used, perplexity exp(H) of the code histogram) of int codes.
    No codes at all give (0, 1), not NaN."""
    counts = torch.bincount(codes.reshape(-1), minlength=vocab_size).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


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

    def check_images(self, images: torch.Tensor, channels: int) -> None:
        """Raise ValueError unless `images` is float (B, `channels`, H, W), H and W multiples of
        `downsample` (what `encode` accepts)."""
        c, f = channels, self.downsample
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"{self.kind}.encode: expected images (B, {c}, H, W) with H, W multiples of {f}, "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"{self.kind}.encode: images must be float in [0, 1], got {images.dtype}"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ValueError unless `codes` is an int (B, h, w) grid in [0, vocab_size) (what a
        discrete `decode` accepts)."""
        if codes.dim() != 3 or codes.is_floating_point():
            raise ValueError(
                f"{self.kind}.decode: expected int codes (B, h, w), got {codes.dtype} "
                f"{tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(
                f"{self.kind}.decode: codes must lie in [0, {self.vocab_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )

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
