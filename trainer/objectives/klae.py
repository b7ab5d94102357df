"""objective=klae: the KL autoencoder of latent diffusion (diffusers `AutoencoderKL` layout),
trained on image-text shards with a pixel loss + kl_weight x KL to N(0, I).

Latent scaling factor: at export (the final checkpoint) every rank encodes the first
`klae_train.scale_batches` micro-batches it trained on in this attempt with the *final* weights, the
count / sum / sum of squares of the posterior means are all-reduced, and 1 / std goes into
`model.safetensors` under `SCALE_KEY` — as SD measured 0.18215 on its trained VAE. Measuring at
the end matters: the latents' scale drifts during training (the KL weight is tiny), so a factor
from the initial weights would be wrong. Means, not posterior samples, because `encode` returns
means (what `t2i tokenize` stores and latent diffusion trains on).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.columns import PIXELS
from trainer.config import TrainConfig
from trainer.engine import export_module_state
from trainer.models.image_tokenizer import compute_psnr
from trainer.models.klae import SCALE_KEY, Klae, KlaeConfig, compute_kl, compute_scaling_factor
from trainer.objectives.common import shard_dataset
from trainer.recon import image_grid, pixels_to_unit

GRID_IMAGES = 8  # originals over reconstructions in the logged PNG grid


def count_forward_flops(cfg: KlaeConfig) -> float:
    """Forward FLOPs of encode (posterior mean) + decode for one `cfg.image_size` image, counted
    by torch on a meta-device copy (no memory, no compute; works under ZeRO-3 partitioning)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = Klae(cfg)
        x = torch.empty(1, 3, cfg.image_size, cfg.image_size)
        with FlopCounterMode(display=False) as counter:
            mean, _ = model.moments(x)
            model.decode_latents(mean)
    return float(counter.get_total_flops())


def compute_recon_loss(kind: str, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per pixel value of |recon - target| ("l1") or (recon - target)^2 ("mse")."""
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    if kind == "mse":
        return F.mse_loss(recon.float(), target.float())
    raise ValueError(f"klae_train.recon_loss must be 'l1' or 'mse', got {kind!r}")


class KlaeObjective:
    name = "klae"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.k = cfg.klae
        self.train_cfg = cfg.klae_train
        self.grid = cfg.klae.image_size // cfg.klae.downsample
        self._fwd_flops_per_image = 0.0
        self._scale_batches: list[torch.Tensor] = []  # uint8 (B, S, S, 3): first micro-batches

    def build_model(self) -> torch.nn.Module:
        self._fwd_flops_per_image = count_forward_flops(self.k)
        return Klae(self.k)

    def dataset(self):
        return shard_dataset(  # captions play no part in the autoencoder
            self.cfg,
            self.name,
            size=self.k.image_size,
            what="image shards",
            hint=" (e.g. `t2i preprocess` output's shards/)",
            images_only=True,
        )

    def loss(self, engine, batch: dict[str, torch.Tensor]):
        images = batch[PIXELS]  # uint8 (B, S, S, 3)
        if len(self._scale_batches) < self.train_cfg.scale_batches:
            self._scale_batches.append(images.detach().clone())
        x = pixels_to_unit(images)  # (B, 3, S, S) in [0, 1], on the batch's device
        mean, logvar, recon = engine(x)  # (B, C, h, w) x2, (B, 3, S, S) in [-1, 1]
        rec = compute_recon_loss(self.train_cfg.recon_loss, recon, x * 2.0 - 1.0)
        kl = compute_kl(mean, logvar).mean()  # nats per image
        loss = rec + self.train_cfg.kl_weight * kl / x[0].numel()  # per pixel value, SD's weighting
        with torch.no_grad():
            psnr = compute_psnr((recon.float().clamp(-1, 1) + 1.0) / 2.0, x)
            metrics = {
                "recon_loss": rec.detach(),
                "kl": kl.detach(),
                "psnr": psnr,
                "latent_std": mean.detach().float().std(),
            }
        return loss, metrics

    @torch.no_grad()
    def measure_scaling_factor(self, engine) -> float:
        """1 / std of the posterior means of the kept micro-batches over all ranks (collective:
        every rank calls it, with the same number of batches — they step in lockstep)."""
        import torch.distributed as dist

        module = engine.module
        was_training = module.training
        module.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares
        for images in self._scale_batches:
            mean, _ = module.moments(pixels_to_unit(images))
            m = mean.detach().double().cpu()
            sums += torch.stack(
                [torch.tensor(m.numel(), dtype=torch.float64), m.sum(), m.square().sum()]
            )
        module.train(was_training)
        if dist.is_available() and dist.is_initialized():
            device = next(module.parameters()).device  # NCCL reduces device tensors only
            sums = sums.to(device)
            dist.all_reduce(sums)
        return compute_scaling_factor(*sums.cpu().tolist())

    @torch.no_grad()
    def log_images(self, engine, batch) -> dict[str, np.ndarray]:
        """Log steps: originals (top row) over posterior-mean reconstructions (bottom row).
        The loop calls it on every rank (a ZeRO-3 forward is a collective), in eval mode."""
        images = batch[PIXELS][:GRID_IMAGES]
        x = pixels_to_unit(images)
        mean, _ = engine.module.moments(x)
        recon = (engine.module.decode_latents(mean).float().clamp(-1, 1) + 1.0) / 2.0
        return {"recon": image_grid([x, recon])}

    def tokens_in_batch(self, batch) -> int:
        """Latent positions (h * w per image): the autoencoder's code budget."""
        return int(batch[PIXELS].shape[0]) * self.grid * self.grid

    def flops_per_token(self) -> float:
        return 3.0 * self._fwd_flops_per_image / (self.grid * self.grid)  # fwd + 2x for bwd

    def export_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """The AutoencoderKL state dict + `SCALE_KEY` (rank 0); every rank must call it."""
        scale = self.measure_scaling_factor(engine)
        state = export_module_state(engine)
        if state is None:
            return None
        state[SCALE_KEY] = torch.tensor(scale, dtype=torch.float32)
        return state
