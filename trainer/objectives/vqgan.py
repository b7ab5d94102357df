"""The VQGAN objective (taming-transformers' `VQModel` + `VQLPIPSWithDiscriminator`), trained on
image-text shards (captions unused) as two engine parts with an optimizer each:

    "model"          the autoencoder. Loss = L1(x, x_rec) [+ w_p * VGG perceptual]
                     + codebook_weight * (codebook + beta * commitment)
                     + [from disc_start] lambda * disc_factor * (-mean D(x_rec)),
                     lambda = taming's adaptive weight at the decoder's last layer.
    "discriminator"  from disc_start: hinge (or vanilla) loss on D(x) vs D(sg[x_rec]), where
                     x_rec is the reconstruction of the same micro-batch (computed once by the
                     "model" part and reused: the engine computes every part's loss before
                     stepping any, so the discriminator sees the pre-step reconstruction).

Before `disc_start` only the autoencoder is updated (`active_parts`), as taming's zero
`disc_factor` does, without spending the discriminator's forward passes. Dead codes (picked fewer
than `dead_code_min_uses` times over `dead_code_every` steps, summed over ranks) are re-seeded
from encoder outputs of the current batch, identically on every rank.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.columns import PIXELS
from trainer.callbacks import Callback
from trainer.config import OptimizerSection, TrainConfig
from trainer.engine import MODEL, export_module_state, set_full_param
from trainer.models.discriminator import (
    D_LOSSES,
    DISC_PREFIX,
    NLayerDiscriminator,
    compute_adaptive_weight,
    compute_conv_weight_grads,
)
from trainer.models.image_tokenizer import compute_code_usage, compute_psnr
from trainer.models.vqgan import (
    Vqgan,
    autoencoder_state,
    compute_vq_losses,
    load_strict,
    to_image_range,
    to_model_range,
)
from trainer.objectives.common import shard_dataset
from trainer.pretrained.image_tokenizers import read_init_state
from trainer.recon import image_grid

DISC = "discriminator"
LOG_IMAGES = 8  # originals / reconstructions shown by `log_images`


class CodeUsage(Callback):
    """This rank's code counts since the last dead-code restart, and that restart's step: a
    stateful loop callback, so a resumed run restarts exactly the codes an uninterrupted one
    would. The counts move to the codes' device with the first batch (a CPU buffer would not
    take CUDA counts, nor could NCCL reduce it)."""

    name = "code_usage"
    stateful = True

    def __init__(self, n_embed: int):
        self.counts = torch.zeros(n_embed, dtype=torch.float64)
        self.restarted_at = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.cpu(), "restarted_at": torch.tensor(self.restarted_at)}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        if state["counts"].shape != self.counts.shape:
            raise ValueError(
                f"{source}: code usage of {state['counts'].numel()} codes, the model has "
                f"{self.counts.numel()}"
            )
        self.counts = state["counts"].to(self.counts.device, torch.float64)
        self.restarted_at = int(state["restarted_at"])


def _dtype(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


class VqganObjective:
    name = "vqgan"
    parts = (MODEL, DISC)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model_cfg = m = cfg.vqgan
        self.train_cfg = t = cfg.vqgan_train
        self.cells = (m.image_size // m.downsample) ** 2  # codes per image: the "tokens"
        self.step = 0  # optimizer step, from the loop's on_step hook
        self._flops_per_token = 0.0
        self._fake: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, sg[x_rec]) for D
        self.usage = CodeUsage(m.n_embed)  # checkpointed: a resume restarts the same codes
        self.callbacks = (self.usage,)
        self._perceptual = None  # built on first use: the driver never needs VGG
        if t.perceptual_weight > 0 and not t.perceptual_weights:
            print(
                "[t2i] vqgan: no vqgan_train.perceptual_weights file: pixel (L1) loss only, no "
                "perceptual term (nothing is downloaded)",
                flush=True,
            )

    # ---- engine protocol ------------------------------------------------------------------

    def build_parts(self) -> dict[str, torch.nn.Module]:
        t = self.train_cfg
        model = Vqgan(self.model_cfg)
        disc = NLayerDiscriminator(t.disc_in_channels, t.disc_ndf, t.disc_num_layers)
        if t.init_from:
            state = read_init_state(t.init_from, self.cfg.storage)
            load_strict(model, autoencoder_state(state), what=t.init_from, layout="VQGAN")
            disc_state = {
                k[len(DISC_PREFIX) :]: v for k, v in state.items() if k.startswith(DISC_PREFIX)
            }
            if disc_state:
                load_strict(
                    disc, disc_state, what=f"{t.init_from} ({DISC_PREFIX}*)", layout="VQGAN"
                )
        # fwd + bwd ~ 3x the autoencoder's forward FLOPs, spread over the code cells (the
        # discriminator's share is left out: it is off for most of a run's early steps).
        self._flops_per_token = 3.0 * model.flops_per_image() / self.cells
        return {MODEL: model, DISC: disc}

    def optimizer_section(self, part: str) -> OptimizerSection:
        """The discriminator has its own lr (`vqgan_train.disc_lr`, default optimizer.lr) and
        betas."""
        o, t = self.cfg.optimizer, self.train_cfg
        if part == DISC:
            return dataclasses.replace(o, lr=t.disc_lr or o.lr, betas=list(t.disc_betas))
        return o

    def active_parts(self, step: int) -> tuple[str, ...]:
        return self.parts if self.gan_on(step) else (MODEL,)

    def gan_on(self, step: int) -> bool:
        t = self.train_cfg
        return step >= t.disc_start and t.disc_factor > 0

    def on_step(self, step: int) -> None:
        """Loop hook, before each micro-batch: the discriminator start follows the step."""
        self.step = step

    def dataset(self):
        return shard_dataset(self.cfg, self.name, size=self.model_cfg.image_size, images_only=True)

    def images(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (B, S, S, C) rows -> (B, C, S, S) in [-1, 1], in the model's dtype."""
        x = batch[PIXELS].permute(0, 3, 1, 2).float().div(255.0)
        return to_model_range(x).to(_dtype(engine))

    def loss(self, engines: dict, batch: dict[str, torch.Tensor], part: str):
        if part == MODEL:
            return self.autoencoder_loss(engines, batch)
        if part == DISC:
            return self.discriminator_loss(engines)
        raise ValueError(f"objective=vqgan has no part {part!r}")

    # ---- losses ---------------------------------------------------------------------------

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor):
        """taming's nll: L1 [+ perceptual_weight * VGG]; returns (nll, l1, perceptual), fp32."""
        t = self.train_cfg
        rec_loss = (x.float() - recon.float()).abs().mean()
        nll = t.pixelloss_weight * rec_loss
        p_loss = torch.zeros((), device=x.device)  # on the images' device, as every metric
        if t.perceptual_weight > 0 and t.perceptual_weights:
            if self._perceptual is None:
                from trainer.models.perceptual import VggPerceptualLoss

                self._perceptual = VggPerceptualLoss(t.perceptual_weights)
            # A frozen feature net outside the engines: it follows the images' device.
            self._perceptual.to(x.device)
            p_loss = self._perceptual(x.float(), recon.float()).mean()
            nll = nll + t.perceptual_weight * p_loss
        return nll, rec_loss, p_loss

    def autoencoder_loss(self, engines: dict, batch: dict[str, torch.Tensor]):
        m, t, ae = self.model_cfg, self.train_cfg, engines[MODEL]
        self.maybe_restart_dead_codes(engines, batch)
        x = self.images(ae, batch)  # (B, C, S, S)
        out = ae(x)
        recon, codes = out["recon"], out["codes"]
        nll, rec_loss, p_loss = self.reconstruction_loss(x, recon)
        codebook, commitment = compute_vq_losses(out["z_e"], out["z_q"])
        loss = nll + t.codebook_weight * (codebook + t.beta * commitment)
        g_loss, d_weight = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
        if self.gan_on(self.step):
            # The discriminator's module, not its engine: this pass belongs to the autoencoder's
            # backward (the engine froze the discriminator's parameters for it).
            disc = engines[DISC].module
            g_loss = -disc(recon.to(_dtype(engines[DISC]))).float().mean()
            d_weight = self.adaptive_weight(engines, x, recon, out["features"])
            loss = loss + d_weight * t.disc_factor * g_loss
            self._fake = (x.detach(), recon.detach())
        with torch.no_grad():
            u = self.usage
            u.counts = u.counts.to(codes.device)  # a no-op after the first batch
            u.counts += torch.bincount(codes.reshape(-1), minlength=m.n_embed).double()
            used, perplexity = compute_code_usage(codes, m.n_embed)
            psnr = compute_psnr(to_image_range(recon), to_image_range(x))
        metrics = {
            "rec_loss": rec_loss.detach(),  # L1 in [-1, 1]
            "p_loss": p_loss.detach(),
            "codebook_loss": codebook.detach(),
            "commitment_loss": commitment.detach(),
            "psnr": psnr,
            "codebook_used": used,  # fraction of the K codes picked in this batch
            "code_perplexity": perplexity,
            "g_loss": g_loss.detach(),
            "d_weight": d_weight,
        }
        return loss, metrics

    def adaptive_weight(self, engines: dict, x, recon, features) -> torch.Tensor:
        """taming's adaptive weight: gradient norms of nll and of the generator loss at the
        decoder's last conv, computed from a detached copy of the reconstruction (see
        `compute_conv_weight_grads`: DeepSpeed's gradient hooks must not see these passes)."""
        r = recon.detach().float().requires_grad_(True)
        nll, _, _ = self.reconstruction_loss(x, r)
        g = -engines[DISC].module(r.to(_dtype(engines[DISC]))).float().mean()
        conv = engines[MODEL].module.decoder.conv_out
        nll_grads, g_grads = compute_conv_weight_grads([nll, g], r, features.detach(), conv)
        return compute_adaptive_weight(nll_grads, g_grads, disc_weight=self.train_cfg.disc_weight)

    def discriminator_loss(self, engines: dict):
        if self._fake is None:
            raise RuntimeError("vqgan: the discriminator part ran before the autoencoder part")
        (x, recon), self._fake = self._fake, None
        disc = engines[DISC]
        logits_real = disc(x.to(_dtype(disc))).float()
        logits_fake = disc(recon.to(_dtype(disc))).float()
        t = self.train_cfg
        d_loss = t.disc_factor * D_LOSSES[t.disc_loss](logits_real, logits_fake)
        metrics = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, metrics

    # ---- dead codes -----------------------------------------------------------------------

    @torch.no_grad()
    def maybe_restart_dead_codes(self, engines: dict, batch: dict[str, torch.Tensor]) -> int:
        """Every `dead_code_every` steps (once, on that step's first micro-batch), replace the
        codes used fewer than `dead_code_min_uses` times since the last restart (counts summed
        over ranks) by encoder outputs drawn from rank 0's batch. Returns how many."""
        every = self.train_cfg.dead_code_every
        u = self.usage
        if not every or self.step == 0 or self.step % every or u.restarted_at == self.step:
            return 0
        u.restarted_at = self.step
        ae = engines[MODEL]
        # The model's device (multi-part objectives run ZeRO <= 2: parameters are whole there):
        # every tensor of the two collectives below lives on it, as NCCL requires.
        device = next(ae.module.parameters()).device
        usage = u.counts.to(device=device, copy=True)  # float64 (n_embed,)
        u.counts.zero_()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(usage)  # float64 (n,) on every rank
        dead = (usage < self.train_cfg.dead_code_min_uses).nonzero().flatten()
        if not len(dead):
            return 0
        z = ae.module.encode_pre_quant(self.images(ae, batch).to(device))  # (B, D, h, w)
        z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B*h*w, D) fp32
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)  # same on all ranks
        rows = torch.randint(len(z), (len(dead),), generator=g).to(device)
        picks = z[rows].contiguous()  # (n_dead, D) fp32 on `device`
        if distributed:
            dist.broadcast(picks, src=0)  # every rank writes the same rows
        weight = ae.module.quantize.embedding.weight
        new = weight.detach().float().clone()
        new[dead] = picks
        set_full_param(weight, new)
        return len(dead)

    # ---- logging and export ---------------------------------------------------------------

    def log_images(self, engines: dict, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Originals (top row) over their reconstructions through the codes (bottom row)."""
        ae = engines[MODEL]
        x = self.images(ae, batch)[:LOG_IMAGES]
        recon = ae.module(x)["recon"]
        return {"reconstructions": image_grid([to_image_range(x), to_image_range(recon)])}

    def tokens_in_batch(self, batch) -> int:
        return int(batch[PIXELS].shape[0]) * self.cells

    def flops_per_token(self) -> float:
        return self._flops_per_token

    def export_state_dict(self, engines: dict) -> dict[str, torch.Tensor] | None:
        """taming's VQModel layout on rank 0 (None elsewhere): the autoencoder's keys in fp32,
        plus `loss.discriminator.*`, so training can go on from the exported file."""
        state = export_module_state(engines[MODEL])
        if state is None:
            return None
        for k, v in engines[DISC].module.state_dict().items():
            v = v.detach()
            state[DISC_PREFIX + k] = (v.float() if v.is_floating_point() else v).contiguous()
        return state
