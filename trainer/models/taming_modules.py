"""taming-transformers' convolutional encoder and decoder (`taming/modules/diffusionmodules/
model.py`, without the timestep embedding), with its module names, so their state-dict keys are
taming's: `conv_in`, `down.<level>.block.<i>.{norm1,conv1,norm2,conv2,nin_shortcut}`,
`down.<level>.attn.<i>.{norm,q,k,v,proj_out}`, `down.<level>.downsample.conv`, `mid.block_1`,
`mid.attn_1`, `mid.block_2`, `up.<level>...`, `norm_out`, `conv_out`. Arguments are taming's
`ddconfig` keys. Used by the VQGAN (`trainer/models/vqgan.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1-conv q, k, v, proj_out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (B, hw, C)
        k = self.k(y).reshape(b, c, h * w).transpose(1, 2)
        v = self.v(y).reshape(b, c, h * w).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block.<i>` (in_channels -> out_channels, then out_channels wide),
    each followed by `attn.<i>` if `attend`; the encoder / decoder sets `downsample` / `upsample`,
    which runs last."""

    def __init__(
        self, in_channels: int, out_channels: int, blocks: int, attend: bool, dropout: float
    ):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        width = in_channels
        for _ in range(blocks):  # block, attn, block, attn...: the init draws in taming's order
            self.block.append(ResnetBlock(width, out_channels, dropout))
            width = out_channels
            if attend:
                self.attn.append(AttnBlock(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Middle(nn.Module):
    """The lowest resolution: `block_1`, `attn_1`, `block_2`, all `channels` wide."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        dropout: float,
        in_channels: int,
        resolution: int,
        z_channels: int,
    ):
        super().__init__()
        mult, res = ch_mult, resolution
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for i, m in enumerate(mult):
            level = Level(width, ch * m, num_res_blocks, res in attn_resolutions, dropout)
            width = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(width)
                res //= 2
            self.down.append(level)
        self.mid = Middle(width, dropout)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f). `up[i]` is level i (built deepest first,
    stored in resolution order, as taming does)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        dropout: float,
        out_ch: int,
        resolution: int,
        z_channels: int,
    ):
        super().__init__()
        mult = ch_mult
        res = resolution // 2 ** (len(mult) - 1)
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = Middle(width, dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = Level(width, ch * mult[i], num_res_blocks + 1, res in attn_resolutions, dropout)
            width = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(width)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.features(z))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Everything but `conv_out`: the input of the last layer, (B, ch*ch_mult[0], H, W).
        taming's adaptive GAN weight differentiates the losses at `conv_out.weight`."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return F.silu(self.norm_out(h))
