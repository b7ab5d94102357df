"""KL autoencoder for latent diffusion, in the state-dict layout of diffusers' `AutoencoderKL`.

    encoder:  images (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2C, H/f, W/f): mean, logvar
    decoder:  latents (B, C, H/f, W/f) -> images (B, 3, H, W) in [-1, 1]

The modules are diffusers' own (`encoder`, `decoder`, `quant_conv`, `post_quant_conv` taken from an
`AutoencoderKL` built from `diffusers_config(cfg)`), so our state dict *is* an AutoencoderKL state
dict: Stable Diffusion's `vae/` weights load into `KlaeTokenizer` strictly, and our exported weights
load into `AutoencoderKL(**diffusers_config(cfg))` strictly.

Latent scaling. Latent diffusion wants latents of roughly unit variance; SD multiplies them by a
constant measured once on data (0.18215 = 1 / std of its KL-f8 latents). We measure ours the same
way at the end of training (`trainer/objectives/klae.py`) and store it in `model.safetensors` as
one extra 0-dim float32 tensor under `SCALE_KEY`; `KlaeTokenizer.from_state` pops it before the
strict load. A diffusers-format directory (`config.json` + `diffusion_pytorch_model.safetensors`)
carries it in `config.json` instead (`scaling_factor`, and `shift_factor` for SD3/FLUX VAEs).

Training uses a pixel loss (L1 or MSE) and the KL term only: SD's VAE also used LPIPS and a patch
GAN, which the VQGAN objective provides for discrete codes. This file imports only torch and
diffusers' model classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.models.checks import check_image_size, check_positive_ints
from trainer.models.image_tokenizer import ImageTokenizer, load_strict

SCALE_KEY = "scaling_factor"  # extra tensor in our model.safetensors: the latent scaling factor
DIFFUSERS_CONFIG = "config.json"  # a diffusers model directory (e.g. SD's `vae/` folder)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")  # AutoencoderKL's submodules


@dataclass
class KlaeConfig:
    """objective=klae: the autoencoder's shape (diffusers `AutoencoderKL` arguments; its loss and
    latent-scale measurement: the `klae_train:` section). Defaults are a small f=4 model; SD's VAE
    is block_out_channels [128, 256, 512, 512], layers_per_block 2, latent_channels 4, groups 32."""

    image_size: int = 32  # training resolution (square); a multiple of the downsampling factor
    # Width of each resolution level; the downsampling factor is 2 ** (levels - 1).
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1  # ResNet blocks per encoder level (the decoder has one more)
    latent_channels: int = 4  # C of the latents
    norm_num_groups: int = 16  # GroupNorm groups; must divide every block width
    mid_block_attention: bool = True  # self-attention in the middle blocks (SD: yes)

    def __post_init__(self):
        check_positive_ints(
            self, ("image_size", "layers_per_block", "latent_channels", "norm_num_groups")
        )
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(
                f"KlaeConfig.block_out_channels must be positive widths, got "
                f"{self.block_out_channels}"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"KlaeConfig.norm_num_groups {self.norm_num_groups} must divide every width in "
                f"block_out_channels {self.block_out_channels} (not {bad[0]})"
            )
        check_image_size(self, f"{len(self.block_out_channels)} levels")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def diffusers_config(cfg: KlaeConfig, scaling_factor: float = 1.0) -> dict:
    """`AutoencoderKL(**diffusers_config(cfg))` has exactly our state-dict layout; written as
    `config.json` it makes a diffusers model directory."""
    levels = len(cfg.block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.image_size,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": cfg.mid_block_attention,
    }


# diffusers config keys and the only values our KlaeConfig can express
_FIXED = {
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "latents_mean": None,
    "latents_std": None,
}


def config_from_diffusers(config: dict, *, source: str) -> tuple[KlaeConfig, float, float]:
    """(KlaeConfig, scaling_factor, shift_factor) of a diffusers `AutoencoderKL` config.json.
    Raises ValueError naming `source` and the key for anything our layout does not cover."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{source}: _class_name {config['_class_name']!r} is not AutoencoderKL")
    for key, expected in _FIXED.items():
        if config.get(key, expected) != expected:
            raise ValueError(
                f"{source}: {key}={config[key]!r} is not supported (expected {expected!r})"
            )
    for key, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        if any(b != block for b in config.get(key, [block])):
            raise ValueError(f"{source}: {key} must all be {block!r}, got {config[key]}")
    channels = list(config.get("block_out_channels", [64]))
    f = 2 ** (len(channels) - 1)
    size = config.get("sample_size", 32)
    size = int(size if isinstance(size, int) else size[0])  # only a default: any multiple of f
    cfg = KlaeConfig(
        image_size=f * max(1, size // f),
        block_out_channels=channels,
        layers_per_block=int(config.get("layers_per_block", 1)),
        latent_channels=int(config.get("latent_channels", 4)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        mid_block_attention=bool(config.get("mid_block_add_attention", True)),
    )
    return (
        cfg,
        float(config.get("scaling_factor", 0.18215)),
        float(config.get("shift_factor") or 0.0),
    )


def build_parts(cfg: KlaeConfig) -> dict[str, nn.Module]:
    """AutoencoderKL's four submodules for `cfg`, built by diffusers itself (same init, names)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**diffusers_config(cfg))
    return {name: getattr(vae, name) for name in PARTS}


def compute_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each image's latent elements: (B,).
    Same formula and clamp as diffusers' `DiagonalGaussianDistribution.kl()`."""
    logvar = logvar.float().clamp(-30.0, 20.0)
    mean = mean.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def compute_scaling_factor(count: float, total: float, total_sq: float) -> float:
    """1 / std of latent values from their count, sum and sum of squares (as SD's 0.18215 is
    1 / std of its latents); these three sums all-reduce across ranks exactly."""
    if count < 2:
        raise ValueError(f"need at least 2 latent values for a scaling factor, got {count}")
    var = (total_sq - total * total / count) / (count - 1)
    if not var > 0 or not math.isfinite(var):
        raise ValueError(f"latent variance is {var}: cannot compute a scaling factor")
    return 1.0 / math.sqrt(var)


class Klae(nn.Module):
    """The trainable autoencoder: images -> posterior -> sampled latents -> reconstruction."""

    def __init__(self, cfg: KlaeConfig):
        super().__init__()
        self.cfg = cfg
        for name, module in build_parts(cfg).items():
            setattr(self, name, module)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> posterior (mean, logvar), each (B, C, H/f, W/f)."""
        x = (images * 2.0 - 1.0).to(self.quant_conv.weight.dtype)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (unclamped)."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images in [0, 1] -> (mean, logvar, reconstruction in [-1, 1]) decoded from a sample
        z = mean + std * eps of the posterior (the reparameterisation trick)."""
        mean, logvar = self.moments(images)
        std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
        z = mean.float() + std * torch.randn_like(std)
        return mean, logvar, self.decode_latents(z)


class KlaeTokenizer(ImageTokenizer):
    """Inference: images -> posterior mean x scaling_factor (no sampling), and back.

    With a `shift_factor` (SD3/FLUX VAEs) latents are (mean - shift) * scale; ours have none."""

    kind = "klae"
    discrete = False

    def __init__(self, cfg: KlaeConfig, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.downsample = cfg.downsample
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        for name, module in build_parts(cfg).items():
            setattr(self, name, module)

    @classmethod
    def from_state(cls, cfg: KlaeConfig, state_dict: dict[str, torch.Tensor]) -> KlaeTokenizer:
        """Our exported weights: the AutoencoderKL state dict plus `SCALE_KEY` (popped here)."""
        state = dict(state_dict)
        if SCALE_KEY not in state:
            raise ValueError(
                f"klae: the state dict has no {SCALE_KEY!r} tensor (the latent scaling factor "
                f"that training stores with the weights); a diffusers-format directory carries "
                f"it in {DIFFUSERS_CONFIG} instead"
            )
        scale = float(state.pop(SCALE_KEY))
        tok = cls(cfg, scaling_factor=scale)
        load_strict(tok, state, what="klae", layout="AutoencoderKL")
        return tok

    @classmethod
    def from_diffusers(
        cls, config: dict, state_dict: dict[str, torch.Tensor], *, source: str = DIFFUSERS_CONFIG
    ) -> KlaeTokenizer:
        """A diffusers `AutoencoderKL` (config.json dict + its state dict), e.g. SD's `vae/`."""
        cfg, scale, shift = config_from_diffusers(config, source=source)
        tok = cls(cfg, scaling_factor=scale, shift_factor=shift)
        load_strict(tok, state_dict, what=source, layout="AutoencoderKL")
        return tok

    def _moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_images(images, 3)
        x = images.float() * 2.0 - 1.0
        return self.quant_conv(self.encoder(x)).float().chunk(2, dim=1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, 3, H, W) in [0, 1] -> latents (B, C, H/f, W/f), float32, scaled."""
        mean, _ = self._moments(images)
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> float32 images (B, 3, h*f, w*f) in [0, 1]."""
        c = self.latent_channels
        if latents.dim() != 4 or latents.shape[1] != c or not latents.is_floating_point():
            raise ValueError(
                f"klae.decode: expected float latents (B, {c}, h, w), got {latents.dtype} "
                f"{tuple(latents.shape)}"
            )
        z = latents.float() / self.scaling_factor + self.shift_factor
        x = self.decoder(self.post_quant_conv(z)).float()
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def describe(self) -> dict:
        out = super().describe()
        if self.shift_factor:
            out["shift_factor"] = self.shift_factor
        return out
