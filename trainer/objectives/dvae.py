"""The dVAE objective (DALL-E stage 1): reconstruct images through a Gumbel-softmax relaxation of
the code grid, plus beta * KL(q || uniform prior), on image-text shards (captions unused).

Schedules (pure functions below, driven by the loop's `on_step(step)` hook):
    tau(step)  : cosine from dvae_train.tau_start to .tau_end over .tau_steps, then held
    beta(step) : cosine from 0 to dvae_train.kl_weight over .kl_warmup_steps, then held

Loss per micro-batch = recon + beta * KL * (h*w) / (C*H*W): both terms are per-image sums divided
by the number of pixel values, so `kl_weight` means what beta means in the paper (6.6).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data_pipeline.columns import PIXELS
from trainer.config import TrainConfig
from trainer.engine import export_module_state
from trainer.models.dvae import (
    Dvae,
    compute_kl_to_uniform,
    compute_recon_loss,
    map_pixels,
    reconstruct,
)
from trainer.models.image_tokenizer import compute_code_usage, compute_psnr
from trainer.objectives.common import shard_dataset
from trainer.recon import image_grid

LOG_IMAGES = 8  # originals / reconstructions shown by `log_images`


def compute_gumbel_tau(step: int, *, start: float, end: float, steps: int) -> float:
    """Gumbel-softmax temperature for optimizer step `step`: cosine from `start` (step 0) to `end`
    (step >= `steps`). DALL-E anneals 1 -> 1/16 over 150k updates."""
    if steps <= 0 or step >= steps:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / steps))


def compute_kl_weight(step: int, *, weight: float, warmup_steps: int) -> float:
    """KL weight beta for step `step`: cosine from 0 (step 0) to `weight` (step >= warmup)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return weight
    return weight * 0.5 * (1.0 - math.cos(math.pi * step / warmup_steps))


class DvaeObjective:
    name = "dvae"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model_cfg = cfg.dvae
        self.train_cfg = cfg.dvae_train
        m = self.model_cfg
        self.cells = (m.image_size // m.downsample) ** 2  # codes per image: the "tokens"
        self.kl_scale = self.cells / (m.channels * m.image_size**2)  # paper's beta -> per value
        self.step = 0  # optimizer step, from the loop's on_step hook
        self._flops_per_token = 0.0

    def build_model(self) -> torch.nn.Module:
        model = Dvae(self.model_cfg)
        # fwd + bwd ~ 3x the forward FLOPs, spread over the image's code cells
        self._flops_per_token = 3.0 * model.flops_per_image() / self.cells
        return model

    def dataset(self):
        return shard_dataset(self.cfg, self.name, size=self.model_cfg.image_size, images_only=True)

    def on_step(self, step: int) -> None:
        """Loop hook, before each micro-batch: the schedules follow the optimizer step."""
        self.step = step

    def tau(self) -> float:
        t = self.train_cfg
        return compute_gumbel_tau(self.step, start=t.tau_start, end=t.tau_end, steps=t.tau_steps)

    def beta(self) -> float:
        t = self.train_cfg
        return compute_kl_weight(self.step, weight=t.kl_weight, warmup_steps=t.kl_warmup_steps)

    def images(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (B, S, S, C) rows -> (B, C, S, S) in [0, 1], in the model's dtype."""
        dtype = next(engine.module.parameters()).dtype
        return batch[PIXELS].permute(0, 3, 1, 2).to(dtype).div(255.0)

    def loss(self, engine, batch: dict[str, torch.Tensor]):
        x = self.images(engine, batch)  # (B, C, S, S)
        tau, beta = self.tau(), self.beta()
        logits, stats = engine(x, tau)  # (B, K, h, w), (B, 2C, S, S)
        target = x.float()
        recon = compute_recon_loss(self.train_cfg.recon_loss, stats, target)
        kl = compute_kl_to_uniform(logits)
        loss = recon + beta * self.kl_scale * kl
        with torch.no_grad():
            used, perplexity = compute_code_usage(logits.argmax(1), self.model_cfg.vocab_size)
            psnr = compute_psnr(reconstruct(stats, target.shape[1]), target)
        metrics = {
            "recon_loss": recon.detach(),
            "psnr": psnr,  # of the relaxed reconstruction being trained
            "kl": kl.detach(),  # nats per grid cell
            "tau": tau,
            "beta": beta,
            "codebook_used": used,  # fraction of the K codes that argmax picks in the batch
            "code_perplexity": perplexity,
        }
        return loss, metrics

    @torch.no_grad()
    def log_images(self, engine, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Originals (top row) over their argmax-code reconstructions (bottom row), as the
        tokenizer will produce them: no Gumbel noise."""
        module = engine.module
        x = self.images(engine, batch)[:LOG_IMAGES]
        codes = module.encoder(map_pixels(x)).argmax(1)  # (N, h, w)
        recon = reconstruct(module.decoder.forward_codes(codes), x.shape[1])
        return {"reconstructions": image_grid([x, recon])}

    def tokens_in_batch(self, batch) -> int:
        return int(batch[PIXELS].shape[0]) * self.cells

    def flops_per_token(self) -> float:
        return self._flops_per_token

    def export_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (the `DvaeTokenizer` layout), None elsewhere."""
        return export_module_state(engine)
