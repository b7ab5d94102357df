"""DALL-E's discrete VAE, single device, in the state-dict layout of OpenAI's `dall_e` package.

    encoder: images (B, C, H, W) -> logits (B, K, H/f, W/f) over K codes per grid cell
    decoder: codes as (relaxed) one-hot (B, K, h, w) -> (B, 2C, H, W): logit-Laplace mu, ln b

`DvaeEncoder.blocks` / `DvaeDecoder.blocks` have exactly the parameter names and shapes of
`dall_e.Encoder.blocks` / `dall_e.Decoder.blocks` (convolutions hold `w` and `b`), so
`encoder.load_state_dict(openai_encoder.state_dict(), strict=True)` works, and a `Dvae` or
`DvaeTokenizer` state dict is the two of them under `encoder.` and `decoder.`.
`trainer.pretrained.converters.convert_openai_dvae` turns OpenAI's files into a tokenizer directory.

One generalisation: `group_count` (OpenAI: always 4, downsampling f = 8) may be set to any G >= 1,
giving f = 2**(G-1) with the same key naming; group g is 2**(g-1) * n_hid wide in the encoder and
2**(G-g) * n_hid wide in the decoder, as OpenAI's four groups are (1, 2, 4, 8 and 8, 4, 2, 1).

Pixels go through OpenAI's `map_pixels` (into [eps, 1-eps], eps = 0.1, where the logit-Laplace
density is defined) before the encoder; reconstructions are `unmap_pixels(sigmoid(mu))`.
This file imports only torch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.checks import check_image_size, check_positive_ints
from trainer.models.image_tokenizer import ImageTokenizer, load_strict

LOGIT_LAPLACE_EPS = 0.1  # OpenAI's `dall_e.utils.logit_laplace_eps`


@dataclass
class DvaeConfig:
    """objective=dvae: shape of the discrete VAE (its training: the `dvae_train:` section).

    Defaults are OpenAI's released dVAE (256 px -> 32x32 codes of 8192).
    """

    image_size: int = 32  # training resolution (square); a multiple of the downsampling factor
    group_count: int = 4  # resolution groups; downsampling f = 2**(group_count-1): 4 -> 8, 3 -> 4
    n_hid: int = 256  # encoder width of group 1 (x2 per group); a multiple of 4
    n_blk_per_group: int = 2  # encoder residual blocks per group
    decoder_n_hid: int = 0  # decoder width of its last group (x2 per group up); 0: n_hid
    decoder_n_blk_per_group: int = 0  # decoder residual blocks per group; 0: n_blk_per_group
    n_init: int = 128  # decoder: width of the code embedding (its 1x1 input conv)
    vocab_size: int = 8192  # K: codes per grid cell
    channels: int = 3  # image channels (encoder input, decoder output)

    def __post_init__(self):
        check_positive_ints(
            self, ("image_size", "group_count", "n_hid", "n_blk_per_group", "n_init")
        )
        for name in ("decoder_n_hid", "decoder_n_blk_per_group"):
            if getattr(self, name) < 0:
                raise ValueError(f"DvaeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size < 2 or self.channels < 1:
            raise ValueError(
                f"DvaeConfig: vocab_size must be >= 2 and channels >= 1, got "
                f"{self.vocab_size} and {self.channels}"
            )
        for name in ("n_hid", "decoder_n_hid"):
            if getattr(self, name) % 4:  # a block's hidden width is its output width / 4
                raise ValueError(
                    f"DvaeConfig.{name} must be a multiple of 4, got {getattr(self, name)}"
                )
        check_image_size(self, f"group_count={self.group_count}")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def dec_n_hid(self) -> int:
        return self.decoder_n_hid or self.n_hid

    @property
    def dec_n_blk(self) -> int:
        return self.decoder_n_blk_per_group or self.n_blk_per_group


# --------------------------------------------------------------------------------------------
# Pure functions: pixel mapping, relaxation, losses
# --------------------------------------------------------------------------------------------


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps] (OpenAI's `map_pixels`): the logit-Laplace support."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1] (OpenAI's `unmap_pixels`)."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def compute_gumbel_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Relaxed one-hot over dim 1: softmax((logits + Gumbel noise) / tau), in float32.

    As tau -> 0 it approaches the one-hot of argmax(logits + noise); inference uses plain argmax.
    """
    return F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=1)


def compute_kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over grid cells of KL(q || uniform over K) in nats, q = softmax(logits) on dim 1."""
    log_q = F.log_softmax(logits.float(), dim=1)  # (B, K, h, w)
    return ((log_q.exp() * log_q).sum(1) + math.log(logits.shape[1])).mean()


def compute_logit_laplace_nll(stats: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per pixel value of `images` in [0, 1] under the paper's
    logit-Laplace density with mu = stats[:, :C] and ln b = stats[:, C:] (after map_pixels):
        -ln p(x) = ln(2b) + ln x + ln(1 - x) + |logit(x) - mu| / b."""
    c = images.shape[1]
    mu, log_b = stats[:, :c].float(), stats[:, c:].float()
    x = map_pixels(images.float())
    nll = math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x)
    return (nll + (torch.logit(x) - mu).abs() * torch.exp(-log_b)).mean()


def reconstruct(stats: torch.Tensor, channels: int) -> torch.Tensor:
    """Decoder output (B, 2C, H, W) -> images (B, C, H, W) in [0, 1] (float32)."""
    return unmap_pixels(torch.sigmoid(stats[:, :channels].float()))


def compute_recon_loss(kind: str, stats: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The reconstruction term per pixel value, `kind` "mse" or "logit_laplace" (see
    `dvae_train.recon_loss` in `trainer.config`)."""
    if kind == "mse":
        return F.mse_loss(reconstruct(stats, images.shape[1]), images.float())
    if kind == "logit_laplace":
        return compute_logit_laplace_nll(stats, images)
    raise ValueError(f"dvae_train.recon_loss must be 'mse' or 'logit_laplace', got {kind!r}")


# --------------------------------------------------------------------------------------------
# Modules (names and shapes are OpenAI's: see the module docstring)
# --------------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """`dall_e.utils.Conv2d`: weight `w` (n_out, n_in, kw, kw) ~ N(0, 1/(n_in kw^2)), bias `b`,
    'same' padding. Computes in the parameters' dtype (the engine picks the precision).

    The weight is used in channels-last order (a copy of a few MB per call): oneDNN then runs the
    whole stack channels-last, ~1.3-1.9x faster on CPU than NCHW, whose convolutions convert each
    activation back and forth. Stored parameters stay in the usual layout: DeepSpeed flattens them.
    """

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x.to(self.w.dtype), w, self.b, padding=(self.kw - 1) // 2)


class ResBlock(nn.Module):
    """OpenAI's EncoderBlock / DecoderBlock: id_path + post_gain * res_path, post_gain = 1/L^2
    (L = residual blocks in the whole stack). The kernel sizes of the four convs differ:
    encoder (3, 3, 3, 1), decoder (1, 3, 3, 3)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = []
        for i, kw in enumerate(kernels):
            layers += [
                (f"relu_{i + 1}", nn.ReLU()),
                (f"conv_{i + 1}", Conv2d(*widths[i : i + 2], kw)),
            ]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


def build_group(
    n_in: int,
    n_out: int,
    n_blk: int,
    n_layers: int,
    kernels: tuple[int, ...],
    resample: tuple[str, nn.Module] | None,
) -> nn.Sequential:
    """`group_g`: block_1 (n_in -> n_out) .. block_n (n_out -> n_out), then `pool`/`upsample`
    (every group but the last)."""
    blocks = [
        (f"block_{i + 1}", ResBlock(n_in if i == 0 else n_out, n_out, n_layers, kernels))
        for i in range(n_blk)
    ]
    return nn.Sequential(OrderedDict(blocks + ([resample] if resample else [])))


class DvaeEncoder(nn.Module):
    """Images mapped to [eps, 1-eps] (B, C, H, W) -> logits (B, K, H/f, W/f)."""

    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        g_count, n_hid, n_blk = cfg.group_count, cfg.n_hid, cfg.n_blk_per_group
        n_layers = g_count * n_blk
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.channels, n_hid, 7))]
        width = n_hid
        for g in range(1, g_count + 1):
            out = 2 ** (g - 1) * n_hid
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < g_count else None
            layers.append(
                (f"group_{g}", build_group(width, out, n_blk, n_layers, ENCODER_KERNELS, pool))
            )
            width = out
        output = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, cfg.vocab_size, 1))])
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DvaeDecoder(nn.Module):
    """Codes as (relaxed) one-hot (B, K, h, w) -> (B, 2C, h*f, w*f): logit-Laplace mu and ln b."""

    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        g_count, n_hid, n_blk = cfg.group_count, cfg.dec_n_hid, cfg.dec_n_blk
        n_layers = g_count * n_blk
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.vocab_size, cfg.n_init, 1))]
        width = cfg.n_init
        for g in range(1, g_count + 1):
            out = 2 ** (g_count - g) * n_hid
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < g_count else None
            layers.append(
                (f"group_{g}", build_group(width, out, n_blk, n_layers, DECODER_KERNELS, up))
            )
            width = out
        output = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, 2 * cfg.channels, 1))])
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Same as `forward(one_hot(codes))` without building the (B, K, h, w) one-hot: a 1x1
        conv of a one-hot is a column lookup of its weight (K = 8192 makes this matter)."""
        conv = self.blocks.input
        table = conv.w[:, :, 0, 0].t()  # (K, n_init)
        x = F.embedding(codes, table).permute(0, 3, 1, 2) + conv.b.view(1, -1, 1, 1)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x


class Dvae(nn.Module):
    """The trainable dVAE: encoder -> Gumbel-softmax relaxation at temperature tau -> decoder."""

    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = DvaeEncoder(cfg)
        self.decoder = DvaeDecoder(cfg)

    def forward(self, images: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [0, 1] -> (logits (B, K, h, w), decoder stats (B, 2C, H, W)).
        The decoder reads the relaxed code mixture (float32 softmax, then the model's dtype)."""
        logits = self.encoder(map_pixels(images))
        soft = compute_gumbel_softmax(logits, tau).to(logits.dtype)  # (B, K, h, w)
        return logits, self.decoder(soft)

    def flops_per_image(self) -> float:
        """Forward FLOPs (2 x multiply-adds of every conv) for one `cfg.image_size` image."""
        size, grid = self.cfg.image_size, self.cfg.image_size // self.cfg.downsample
        total = 0.0
        for part, side_of_group in (
            (self.encoder, lambda g: size // 2 ** (g - 1)),
            (self.decoder, lambda g: grid * 2 ** (g - 1)),
        ):
            for name, module in part.blocks.named_children():
                if name == "input":
                    side = size if part is self.encoder else grid
                elif name == "output":
                    side = grid if part is self.encoder else size
                else:
                    side = side_of_group(int(name.split("_")[1]))
                total += sum(
                    2.0 * c.w.numel() * side * side
                    for c in module.modules()
                    if isinstance(c, Conv2d)
                )
        return total


class DvaeTokenizer(ImageTokenizer):
    """Inference: images -> argmax codes (no noise), codes -> images. Same keys as `Dvae`."""

    kind = "dvae"
    discrete = True

    def __init__(self, cfg: DvaeConfig):
        super().__init__()
        self.cfg = cfg
        self.downsample = cfg.downsample
        self.vocab_size = cfg.vocab_size
        self.encoder = DvaeEncoder(cfg)
        self.decoder = DvaeDecoder(cfg)

    @classmethod
    def from_state(cls, cfg: DvaeConfig, state_dict: dict[str, torch.Tensor]) -> DvaeTokenizer:
        tok = cls(cfg)
        load_strict(tok, state_dict, what="dvae", layout="dVAE")
        return tok

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, C, H, W) in [0, 1] -> code logits (B, K, H/f, W/f), float32."""
        self.check_images(images, self.cfg.channels)
        return self.encoder(map_pixels(images.float())).float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, C, H, W) in [0, 1] -> int64 codes (B, H/f, W/f): argmax, no noise."""
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes (B, h, w) in [0, K) -> float32 images (B, C, h*f, w*f) in [0, 1]."""
        self.check_codes(codes)
        return reconstruct(self.decoder.forward_codes(codes.long()), self.cfg.channels)
