"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`, BatchNorm variant) and the GAN
losses of taming's `VQLPIPSWithDiscriminator`.

The discriminator maps images (B, C, H, W) to a map of real/fake logits (B, 1, h', w'): one
logit per overlapping patch (70x70 pixels for 3 layers), so it judges local texture. Its keys are
taming's `main.<i>.*`; in a taming checkpoint they sit under `loss.discriminator.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISC_PREFIX = "loss.discriminator."  # where taming's VQModel keeps these keys


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in the running statistics' dtype (fp32): mixed-precision engines cast
    parameters to bf16 but keep buffers in fp32, and CPU batch_norm wants one dtype. Same keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        momentum = self.momentum or 0.0
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(
            x.to(dtype),
            self.running_mean,
            self.running_var,
            self.weight.to(dtype),
            self.bias.to(dtype),
            self.training or self.running_mean is None,
            momentum,
            self.eps,
        )
        return y.to(x.dtype)


class NLayerDiscriminator(nn.Module):
    """conv(4, s2) + LeakyReLU, then `n_layers - 1` x [conv(4, s2) + BN + LeakyReLU], one
    conv(4, s1) + BN + LeakyReLU, and a 1-channel conv(4, s1): logits per patch."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
            BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def init_weights(m: nn.Module) -> None:
    """taming's `weights_init`: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


def compute_hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def compute_vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))]): the non-saturating BCE form."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": compute_hinge_d_loss, "vanilla": compute_vanilla_d_loss}


def compute_adaptive_weight(
    nll_grads: torch.Tensor, g_grads: torch.Tensor, *, disc_weight: float
) -> torch.Tensor:
    """taming's `calculate_adaptive_weight` from the two gradients at the decoder's last layer:
    ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], times `disc_weight`, detached. It
    balances the GAN term against reconstruction whatever their scales (VQGAN paper, eq. 7)."""
    weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


def compute_conv_weight_grads(
    losses: list[torch.Tensor], output: torch.Tensor, conv_input: torch.Tensor, conv: nn.Conv2d
) -> list[torch.Tensor]:
    """d loss / d conv.weight for each loss, where `output = conv(conv_input)` and each loss is a
    function of `output` (a leaf that requires grad). Same values as `autograd.grad(loss,
    conv.weight)`, but the autograd passes stop at `output`: they never reach the model's
    parameters, whose hooks (DeepSpeed's gradient reduction) must only run in the real backward."""
    grads = []
    for loss in losses:
        (g_out,) = torch.autograd.grad(loss, output, retain_graph=True)
        grads.append(
            torch.nn.grad.conv2d_weight(
                conv_input.float(),
                conv.weight.shape,
                g_out.float(),
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
            )
        )
    return grads
