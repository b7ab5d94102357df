"""DALL-E's discrete VAE (OpenAI `dall_e` state-dict layout). Being built: see issue 5."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DvaeConfig:
    """objective=dvae: shape and training schedule of the discrete VAE."""

    image_size: int = 32  # training resolution (square)
