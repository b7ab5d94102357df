"""One loading API for every image tokenizer: dVAE and VQGAN (discrete codes), KL-AE (latents).

    tok = load_image_tokenizer("runs/demo/train/dvae-digits")   # a run, a checkpoint, or a
    codes = tok.encode(images)                                 # `t2i convert` output directory
    recon = tok.decode(codes)

Images are float32 tensors (B, 3, H, W) in [0, 1] (H and W multiples of `tok.downsample`).
Discrete tokenizers return int64 codes (B, H/f, W/f) in [0, vocab_size); the KL autoencoder returns
latents (B, C, H/f, W/f) already multiplied by its `scaling_factor` (so they have ~unit variance,
as latent diffusion expects) and `decode` undoes that scaling.

A tokenizer directory holds `model.safetensors` (the model's own state dict) and `config.yaml` (a
`t2i train` config whose `objective` names the kind and whose section of that name is its shape).
Every exported `t2i train` checkpoint is such a directory, and so is what `t2i convert` writes.
A diffusers `AutoencoderKL` directory (`config.json` + `diffusion_pytorch_model.safetensors`, as
Stable Diffusion's `vae/` folder) loads too, as a KL-AE with the `scaling_factor` of its config.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from data_pipeline import fs

if TYPE_CHECKING:  # trainer.config imports the model modules, which subclass ImageTokenizer
    from trainer.config import StorageConfig, TrainConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


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


def _dvae(cfg: TrainConfig, state: dict) -> ImageTokenizer:
    from trainer.models.dvae import DvaeTokenizer

    return DvaeTokenizer.from_state(cfg.dvae, state)


def _vqgan(cfg: TrainConfig, state: dict) -> ImageTokenizer:
    from trainer.models.vqgan import VqganTokenizer

    return VqganTokenizer.from_state(cfg.vqgan, state)


def _klae(cfg: TrainConfig, state: dict) -> ImageTokenizer:
    from trainer.models.klae import KlaeTokenizer

    return KlaeTokenizer.from_state(cfg.klae, state)


# objective name -> builder(config, state dict) -> tokenizer (strict loading inside each builder)
BUILDERS: dict[str, Callable[[TrainConfig, dict], ImageTokenizer]] = {
    "dvae": _dvae,
    "vqgan": _vqgan,
    "klae": _klae,
}


def _tokenizer_dir(loc: fs.Location) -> fs.Location:
    """`loc` itself when it holds weights + config; else the newest complete checkpoint of the run
    at `loc` that has exported weights."""
    from trainer.checkpoint import find_exported

    return find_exported(loc, weights=WEIGHTS, config=CONFIG, what="image tokenizer")


def load_image_tokenizer(
    path: str, *, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> ImageTokenizer:
    """Load a dVAE, VQGAN or KL-AE from a local or s3:// directory (see the module docstring).

    Weights load with safetensors (no pickle) and `strict=True`; the tokenizer is in eval mode.
    """
    from safetensors.torch import load_file

    from trainer.config import StorageConfig, TrainConfig, load_config

    storage = storage or StorageConfig()
    loc = fs.resolve(path, endpoint_url=storage.endpoint_url, region=storage.region)
    if _is_diffusers_dir(loc):
        return _load_diffusers_klae(loc, device)
    src = _tokenizer_dir(loc)
    tmp = tempfile.mkdtemp(prefix="t2i-tokenizer-")
    try:
        for name in (WEIGHTS, CONFIG):
            with open(os.path.join(tmp, name), "wb") as out:
                out.write(fs.read_bytes(src.join(name)))
        cfg = load_config(TrainConfig, os.path.join(tmp, CONFIG), require=False)
        if cfg.objective not in BUILDERS:
            raise ValueError(
                f"{src.join(CONFIG).uri}: objective {cfg.objective!r} is not an image tokenizer "
                f"(expected one of {', '.join(BUILDERS)})"
            )
        state = load_file(os.path.join(tmp, WEIGHTS))
        _, digest = fs.file_digest(os.path.join(tmp, WEIGHTS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = BUILDERS[cfg.objective](cfg, state)
    tok.fingerprint = digest
    return tok.to(device).eval()


def _is_diffusers_dir(loc: fs.Location) -> bool:
    from trainer.models.klae import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS

    return fs.exists(loc.join(DIFFUSERS_CONFIG)) and fs.exists(loc.join(DIFFUSERS_WEIGHTS))


def _load_diffusers_klae(loc: fs.Location, device: str | torch.device) -> ImageTokenizer:
    """A diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)."""
    import hashlib
    import json

    from safetensors.torch import load

    from trainer.models.klae import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, KlaeTokenizer

    cfg_loc = loc.join(DIFFUSERS_CONFIG)
    try:
        config = json.loads(fs.read_bytes(cfg_loc))
    except ValueError as e:
        raise ValueError(f"{cfg_loc.uri}: not valid JSON: {e}") from None
    weights = fs.read_bytes(loc.join(DIFFUSERS_WEIGHTS))
    tok = KlaeTokenizer.from_diffusers(config, load(weights), source=cfg_loc.uri)
    tok.fingerprint = hashlib.sha256(weights).hexdigest()
    return tok.to(device).eval()
