"""VQGAN (taming-transformers `VQModel` state-dict layout). Being built: see issue 5."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VqganConfig:
    """objective=vqgan: autoencoder, codebook, discriminator and loss weights."""

    image_size: int = 32  # training resolution (square)
