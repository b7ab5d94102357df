"""KL autoencoder for latent diffusion (diffusers `AutoencoderKL`). Being built: see issue 5."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KlaeConfig:
    """objective=klae: the autoencoder's shape, KL weight and latent scaling."""

    image_size: int = 32  # training resolution (square)
