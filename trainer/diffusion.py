"""Diffusion math for latent diffusion: pure functions, shared by the `ldm` objective and sampler.

The noise schedule is diffusers' (`DDPMScheduler`'s `alphas_cumprod`), not re-derived here;
these functions take ᾱ (alphas_cumprod, shape (T,)) and apply the closed forms of DDPM / LDM:

    forward process   z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε                      (Ho et al. 2020, eq. 4)
    ε target          ε
    v target          v = √ᾱ_t ε − √(1 − ᾱ_t) z_0                           (Salimans & Ho 2022)
    min-SNR-γ         w_t = min(SNR_t, γ) / SNR_t (ε) or / (SNR_t + 1) (v)  (Hang et al. 2023)
    guidance          ε̂ = ε_uncond + s (ε_cond − ε_uncond)                  (Ho & Salimans 2022)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass
class NoiseSchedule:
    """The training noise schedule, in diffusers' `DDPMScheduler` terms (SD's values default)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def scheduler_config(self, prediction_type: PredictionType) -> dict:
        """Arguments of diffusers' schedulers (also the exported `scheduler_config.json`)."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=prediction_type,
            clip_sample=False,  # latents are not bounded like pixels
            steps_offset=1,
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T-1 (float32), from diffusers' DDPMScheduler."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(**self.scheduler_config("epsilon"))
        return sched.alphas_cumprod.to(torch.float32)


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast against `like` (B, C, h, w), in float32."""
    v = values.to(like.device)[t].float()
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def compute_noisy(
    z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """q(z_t | z_0) sampled in closed form: √ᾱ_t z_0 + √(1 − ᾱ_t) ε. (B, C, h, w) float32."""
    ab = _at(alphas_cumprod, t, z0)
    return ab.sqrt() * z0.float() + (1.0 - ab).sqrt() * eps.float()


def compute_target(
    kind: PredictionType,
    z0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the U-Net learns to predict: ε, or v = √ᾱ_t ε − √(1 − ᾱ_t) z_0."""
    if kind == "epsilon":
        return eps.float()
    if kind == "v_prediction":
        ab = _at(alphas_cumprod, t, z0)
        return ab.sqrt() * eps.float() - (1.0 - ab).sqrt() * z0.float()
    raise ValueError(f"ldm.prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")


def compute_snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t), (B,) float32."""
    ab = alphas_cumprod.to(t.device)[t].float()
    return ab / (1.0 - ab)


def compute_min_snr_weights(
    kind: PredictionType, t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ (B,); all ones when gamma <= 0 (off)."""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    snr = compute_snr(t, alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1.0)


def compute_caption_drop(batch_size: int, p: float, generator=None, device=None) -> torch.Tensor:
    """(B,) bool: which captions are replaced by the empty caption (classifier-free guidance
    training, p ≈ 0.1). Draws from `generator` (or torch's global stream)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ldm.caption_dropout must lie in [0, 1], got {p}")
    return torch.rand(batch_size, generator=generator, device=device) < p


def compute_guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε_uncond + s (ε_cond − ε_uncond); s = 1 is ε_cond exactly."""
    if scale == 1.0:
        return eps_cond
    return eps_uncond + scale * (eps_cond - eps_uncond)

