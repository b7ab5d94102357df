"""VQGAN autoencoder in taming-transformers' `VQModel` state-dict layout.

    encoder          taming `Encoder`   images in [-1, 1] (B, 3, H, W) -> z_e (B, z_channels, h, w)
    quant_conv       1x1 conv           -> (B, embed_dim, h, w)
    quantize         nearest codebook entry (`quantize.embedding.weight`, (n_embed, embed_dim))
    post_quant_conv  1x1 conv           -> (B, z_channels, h, w)
    decoder          taming `Decoder`   -> reconstruction (B, 3, H, W) in ~[-1, 1]

h = H / f with f = 2 ** (len(ch_mult) - 1). Module and parameter names are taming's, so the
autoencoder part of a taming checkpoint (`encoder.*`, `decoder.*`, `quantize.embedding.weight`,
`quant_conv.*`, `post_quant_conv.*`) loads here with `strict=True`; its `loss.*` keys (LPIPS and
discriminator) are not part of the autoencoder. Tokenizer I/O is in [0, 1]; the model works in
[-1, 1] internally, as taming's does.

This file is single-device torch only (no distributed code): the objective
(`trainer/objectives/vqgan.py`) adds the discriminator, the loss weighting and dead-code restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.checks import check_image_size, check_positive_ints
from trainer.models.image_tokenizer import ImageTokenizer, load_strict
from trainer.models.taming_modules import Decoder, Encoder

LOSS_PREFIX = "loss."  # taming's loss module: `loss.discriminator.*`, `loss.perceptual_loss.*`


@dataclass
class VqganConfig:
    """objective=vqgan: autoencoder (taming `ddconfig`) and codebook shape (its training, with the
    discriminator and loss weights: the `vqgan_train:` section).

    Shape defaults are a small f=4 model (32 px -> 8x8 codes of 512); taming's ImageNet f=16
    model is ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
    z_channels=embed_dim=256, n_embed=1024 at image_size=256.
    """

    # --- taming ddconfig (`resolution` is image_size) ---
    image_size: int = 32  # training resolution (square); a multiple of the downsampling factor
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32  # base width; every level's width (ch * mult) must be a multiple of 32 (GroupNorm)
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2])  # f = 2 ** (len - 1)
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)  # sides with self-attention
    dropout: float = 0.0
    z_channels: int = 64
    double_z: bool = False  # taming's key; a VQGAN needs False (True is the KL autoencoder's)
    # --- codebook ---
    n_embed: int = 512  # K: codebook entries (the image vocabulary)
    embed_dim: int = 32  # width of each entry

    def __post_init__(self):
        check_positive_ints(
            self, ("image_size", "ch", "num_res_blocks", "z_channels", "n_embed", "embed_dim")
        )
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"VqganConfig.ch_mult must be positive ints, got {self.ch_mult}")
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ValueError(
                f"VqganConfig: every level width ch * ch_mult must be a multiple of 32 (taming's "
                f"GroupNorm has 32 groups), got ch={self.ch}, ch_mult={self.ch_mult}"
            )
        if self.double_z:
            raise ValueError("VqganConfig.double_z must be false for a VQGAN (taming's configs)")
        check_image_size(self, f"len(ch_mult)={len(self.ch_mult)}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def ddconfig(self) -> dict:
        """taming's `ddconfig` mapping (what `Encoder(**ddconfig)` takes)."""
        return {
            "double_z": self.double_z,
            "z_channels": self.z_channels,
            "resolution": self.image_size,
            "in_channels": self.in_channels,
            "out_ch": self.out_ch,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": list(self.attn_resolutions),
            "dropout": self.dropout,
        }


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (taming's input range)."""
    return images * 2.0 - 1.0


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def compute_nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each vector: z (N, D), codebook (K, D) -> (N,).

    Same expression as taming's `VectorQuantizer` (z^2 + e^2 - 2 z.e), so codes agree exactly
    with it in fp32; computed in fp32 whatever the training precision."""
    z, e = z.float(), codebook.float()
    d = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.matmul(z, e.t())
    return torch.argmin(d, dim=1)


def compute_vq_losses(z: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss ||sg[z_e] - e||^2, commitment loss ||z_e - sg[e]||^2), means, fp32.

    The VQ-VAE paper weights the commitment term by beta; taming's legacy quantizer puts beta on
    the codebook term instead. We follow the paper."""
    codebook = F.mse_loss(z_q.float(), z.detach().float())
    commitment = F.mse_loss(z.float(), z_q.detach().float())
    return codebook, commitment


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with the straight-through gradient (`embedding.weight`)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # taming's init

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> int64 codes (B, h, w)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        return compute_nearest_codes(flat, self.embedding.weight).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes (B, h, w) -> codebook vectors (B, D, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        """z (B, D, h, w) -> (z_q with the straight-through gradient, codes (B, h, w), raw z_q
        carrying the codebook gradient)."""
        codes = self.codes(z)
        z_q = self.lookup(codes).to(z.dtype)
        return z + (z_q - z).detach(), codes, z_q


class Vqgan(nn.Module):
    """The autoencoder (taming `VQModel` without its loss module)."""

    def __init__(self, cfg: VqganConfig):
        super().__init__()
        self.cfg = cfg
        shape = dict(
            ch=cfg.ch,
            ch_mult=list(cfg.ch_mult),
            num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=list(cfg.attn_resolutions),
            dropout=cfg.dropout,
            resolution=cfg.image_size,
            z_channels=cfg.z_channels,
        )
        self.encoder = Encoder(in_channels=cfg.in_channels, **shape)
        self.decoder = Decoder(out_ch=cfg.out_ch, **shape)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] (B, C, H, W) -> z_e (B, embed_dim, h, w), before quantisation."""
        return self.quant_conv(self.encoder(x))

    def decode_quant(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised vectors (B, embed_dim, h, w) -> images in ~[-1, 1] (B, C, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x in [-1, 1] -> {recon, codes (B, h, w), z_e, z_q (codebook gradient path),
        features (the input of the decoder's last layer)}."""
        z_e = self.encode_pre_quant(x)
        z_st, codes, z_q = self.quantize(z_e)
        features = self.decoder.features(self.post_quant_conv(z_st))
        recon = self.decoder.conv_out(features)
        return {"recon": recon, "codes": codes, "z_e": z_e, "z_q": z_q, "features": features}

    def flops_per_image(self) -> float:
        """Forward FLOPs of one `cfg.image_size` image: 2 x multiply-adds of every conv (the
        attention matmuls are small at these grids and left out)."""
        total = 0.0

        def hook(mod, inp, out):
            nonlocal total
            k = mod.weight[0].numel()  # in_channels/groups * kh * kw
            total += 2.0 * k * out.numel()

        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        handles = [m.register_forward_hook(hook) for m in convs]
        p, size = next(self.parameters()), self.cfg.image_size
        try:
            with torch.no_grad():
                self(
                    torch.zeros(1, self.cfg.in_channels, size, size, dtype=p.dtype, device=p.device)
                )
        finally:
            for h in handles:
                h.remove()
        return total


# --------------------------------------------------------------------------------------------
# Tokenizer and strict loading
# --------------------------------------------------------------------------------------------


def autoencoder_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without taming's `loss.*` keys (LPIPS, discriminator)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(LOSS_PREFIX)}


class VqganTokenizer(ImageTokenizer, Vqgan):
    """Inference: images in [0, 1] -> int64 codes, codes -> images in [0, 1]. It is a `Vqgan`
    (same modules, so the same taming keys) with the tokenizer API on top."""

    kind = "vqgan"
    discrete = True

    def __init__(self, cfg: VqganConfig):
        super().__init__(cfg)  # Vqgan.__init__ (ImageTokenizer defines none)
        self.downsample = cfg.downsample
        self.vocab_size = cfg.n_embed

    @classmethod
    def from_state(cls, cfg: VqganConfig, state_dict: dict[str, torch.Tensor]) -> VqganTokenizer:
        """Strict load of the autoencoder keys; taming's `loss.*` keys are ignored."""
        tok = cls(cfg)
        load_strict(tok, autoencoder_state(state_dict), what="vqgan", layout="VQGAN")
        return tok

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, C, H, W) in [0, 1] -> int64 codes (B, H/f, W/f)."""
        self.check_images(images, self.cfg.in_channels)
        z_e = self.encode_pre_quant(to_model_range(images.to(self.quant_conv.weight.dtype)))
        return self.quantize.codes(z_e)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes (B, h, w) in [0, K) -> float32 images (B, C, h*f, w*f) in [0, 1]."""
        self.check_codes(codes)
        return to_image_range(self.decode_quant(self.quantize.lookup(codes.long())))
