"""The latent-diffusion U-Net: diffusers' `UNet2DConditionModel`, built from a small shape config.

    (z_t (B, C, h, w), t (B,), text states (B, L, D), text mask (B, L)) -> predicted ε or v (B, C, h, w)

Why diffusers' module and not our own: it is maintained, and its state-dict names are the
ecosystem's contract — an exported `unet/` folder (`config.json` + safetensors) loads with
`UNet2DConditionModel.from_pretrained`, and Stable Diffusion's `unet/` weights load into ours.
Cross-attention is diffusers': queries from U-Net features, keys/values from the text states.

`UnetConfig` names what varies between presets; `diffusers_config` turns it into the
constructor's arguments (block types from `attention_levels`, heads from `head_channels`). This
file imports only torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class UnetConfig:
    """objective=ldm: the U-Net's shape. Defaults are the `tiny` preset (tests)."""

    sample_size: int = 8  # latent side h = w the model is built for (diffusers metadata only)
    in_channels: int = 4  # latent channels C (the KL-AE's latent_channels)
    # Width of each resolution level; every level but the last halves the resolution.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    # Per level: cross-attention transformer blocks (True) or plain ResNet blocks (False).
    attention_levels: list[bool] = field(default_factory=lambda: [True, True])
    # Per level: transformer layers in each attention block (SDXL: [1, 2, 10]).
    transformer_layers: list[int] = field(default_factory=lambda: [1, 1])
    layers_per_block: int = 1  # ResNet blocks per down level (up levels have one more)
    head_channels: int = 16  # width of one attention head (SD: 64); heads = width / head_channels
    cross_attention_dim: int = 32  # text state width D: the text encoder's width (SD-2: 1024)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every block width (SD: 32)

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field. Not in __post_init__: dotted
        overrides apply one field at a time, so intermediate states may be inconsistent."""
        levels = len(self.block_out_channels)
        for key in ("attention_levels", "transformer_layers"):
            if len(getattr(self, key)) != levels:
                raise ValueError(
                    f"unet.{key} has {len(getattr(self, key))} entries but "
                    f"unet.block_out_channels has {levels} levels"
                )
        for width in self.block_out_channels:
            if width % self.norm_num_groups or width % self.head_channels:
                raise ValueError(
                    f"unet.block_out_channels entry {width} must be a multiple of "
                    f"unet.norm_num_groups={self.norm_num_groups} and "
                    f"unet.head_channels={self.head_channels}"
                )
        if self.sample_size % (2 ** (levels - 1)):
            raise ValueError(
                f"unet.sample_size={self.sample_size} must be divisible by 2**(levels-1)="
                f"{2 ** (levels - 1)}"
            )

    @property
    def latent_shape(self) -> list[int]:
        return [self.in_channels, self.sample_size, self.sample_size]

    @classmethod
    def from_preset(cls, name: str) -> UnetConfig:
        """The named preset (configs accept `preset: NAME`, see `data_pipeline.config`)."""
        return unet_preset(name)


PRESETS: dict[str, dict] = {
    "tiny": {},  # the dataclass defaults: 1.1M parameters, for tests
    # The demo: 4x8x8 digit latents, the demo CLIP's 128-wide text states; 4.0M parameters.
    # Cross-attention at 4x4 only: at 8x8 it doubled the step time on 2 CPU cores.
    "digits": dict(
        sample_size=8,
        block_out_channels=[64, 128],
        attention_levels=[False, True],
        transformer_layers=[1, 1],
        layers_per_block=1,
        head_channels=32,
        cross_attention_dim=128,
        norm_num_groups=16,
    ),
    # Stable Diffusion 2 base (stabilityai/stable-diffusion-2-base unet/config.json): 865.9M.
    "sd2base": dict(
        sample_size=64,
        block_out_channels=[320, 640, 1280, 1280],
        attention_levels=[True, True, True, False],
        transformer_layers=[1, 1, 1, 1],
        layers_per_block=2,
        head_channels=64,
        cross_attention_dim=1024,
        norm_num_groups=32,
    ),
    # SDXL's U-Net dimensions (2.6B) without its micro-conditioning embedding (pooled text +
    # size/crop ids), which our latent datasets do not carry.
    "sdxl": dict(
        sample_size=128,
        block_out_channels=[320, 640, 1280],
        attention_levels=[False, True, True],
        transformer_layers=[1, 2, 10],
        layers_per_block=2,
        head_channels=64,
        cross_attention_dim=2048,
        norm_num_groups=32,
    ),
}


def unet_preset(name: str, **overrides) -> UnetConfig:
    """A named UnetConfig (`tiny`, `digits`, `sd2base`, `sdxl`) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = replace(UnetConfig(**PRESETS[name]), **overrides)
    cfg.check()
    return cfg


def diffusers_config(cfg: UnetConfig) -> dict:
    """`UNet2DConditionModel(**diffusers_config(cfg))` arguments (also its `config.json`)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        # diffusers reads `attention_head_dim` as the number of heads per level (a historical
        # misnomer its docs acknowledge): SD-2's [5, 10, 20, 20] are 64-wide heads.
        attention_head_dim=tuple(w // cfg.head_channels for w in cfg.block_out_channels),
        transformer_layers_per_block=tuple(cfg.transformer_layers),
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=True,
    )


class Unet(torch.nn.Module):
    """`UNet2DConditionModel` under the name `unet`: state-dict keys are `unet.<diffusers key>`.

    The wrapper exists for one reason: a forward that takes the text mask as a boolean tensor and
    returns a plain tensor (DeepSpeed engines and activation checkpointing want tensors out)."""

    def __init__(self, cfg: UnetConfig, unet_config: dict | None = None):
        """`unet_config`: the constructor arguments of a released U-Net (its `config.json`
        without diffusers' `_` keys); `cfg` then only names its latent and text shapes."""
        super().__init__()
        from diffusers import UNet2DConditionModel

        if unet_config is None:
            cfg.check()
            unet_config = diffusers_config(cfg)
        self.cfg = cfg
        self.unet = UNet2DConditionModel(**unet_config)

    def forward(
        self,
        z_t: torch.Tensor,  # (B, C, h, w) noisy latents, in the model's dtype
        t: torch.Tensor,  # (B,) int64 timesteps
        text: torch.Tensor,  # (B, L, D) text states, in the model's dtype
        text_mask: torch.Tensor | None = None,  # (B, L) bool: True = attend; None: all tokens
    ) -> torch.Tensor:
        mask = None if text_mask is None else text_mask.to(z_t.dtype)  # diffusers: 1 keep, 0 drop
        return self.unet(z_t, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample

    def enable_activation_checkpointing(self) -> None:
        """Recompute each ResNet/transformer block in backward (diffusers' own mechanism)."""
        self.unet.enable_gradient_checkpointing()


def shape_of(unet_config: dict, base: UnetConfig | None = None) -> UnetConfig:
    """The latent and text shape of a released U-Net's config, as a UnetConfig (`base`'s other
    fields; they do not describe the released model, whose config builds it)."""
    return replace(
        base or UnetConfig(),
        sample_size=int(unet_config.get("sample_size") or 64),
        in_channels=int(unet_config.get("in_channels", 4)),
        cross_attention_dim=int(unet_config.get("cross_attention_dim", 768)),
    )


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' LoRA examples' attention layers


def add_lora(model: Unet, rank: int, alpha: float = 0.0) -> None:
    """Freeze `model` and add peft LoRA adapters (rank `rank`, scale alpha / rank; alpha 0:
    rank) to its attention projections; only they train. diffusers' `add_adapter`, as its LoRA
    training examples call it; state-dict names gain `.base_layer` / `.lora_A.default` parts."""
    from peft import LoraConfig

    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        init_lora_weights="gaussian",
        target_modules=LORA_TARGETS,
    )
    model.unet.add_adapter(config)


def lora_state_for_diffusers(model: Unet) -> dict[str, torch.Tensor]:
    """The adapters of `model` in the layout `StableDiffusionPipeline.save_lora_weights` takes
    (`unet_lora_layers`), as diffusers' LoRA training script converts them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))


def count_forward_flops(cfg: UnetConfig, text_len: int, unet_config: dict | None = None) -> float:
    """Forward FLOPs for one latent with `text_len` text states, counted by torch on a
    meta-device copy (no memory, no compute; safe under ZeRO-3 partitioning)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = Unet(cfg, unet_config)
        z = torch.empty(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        text = torch.empty(1, text_len, cfg.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            model(z, torch.zeros(1, dtype=torch.long), text)
    return float(counter.get_total_flops())
