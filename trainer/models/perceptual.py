"""Perceptual loss from VGG16 features, with weights the user supplies as a local file.

LPIPS (which taming uses) = distances between unit-normalised VGG16 activations at relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3, weighted per channel by learned 1x1 convs. The learned
weights are LPIPS's own download; here every channel weighs the same (LPIPS's "baseline" VGG
variant), so the only file needed is torchvision's `vgg16` state dict (`features.*` keys are read,
the classifier's are ignored). Nothing is downloaded: without a file there is no perceptual term.
"""

from __future__ import annotations

import torch
from torch import nn

# Cut points of `torchvision.models.vgg16().features` after relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3 (taming's `vgg16` slices).
SLICE_ENDS = (4, 9, 16, 23, 30)
# LPIPS's ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VggPerceptualLoss(nn.Module):
    """Mean over layers of the spatially averaged squared distance between channel-normalised
    features: (B, 3, H, W) pair in [-1, 1] -> (B,). Frozen: no parameter requires grad."""

    def __init__(self, weights_path: str):
        super().__init__()
        from safetensors.torch import load_file
        from torchvision.models.vgg import cfgs, make_layers

        # `vgg16().features` without building (and allocating) the 120M-parameter classifier.
        features = make_layers(cfgs["D"], batch_norm=False)
        if weights_path.endswith(".safetensors"):
            state = load_file(weights_path)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(
                f"{weights_path}: no 'features.*' keys: expected a torchvision vgg16 state dict "
                f"(first key found: {next(iter(state), None)!r})"
            )
        try:
            features.load_state_dict(feats, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path}: not a torchvision vgg16 state dict: {e}") from None
        self.features = features[: SLICE_ENDS[-1]]
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval: a fixed feature extractor
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out, start = [], 0
        for end in SLICE_ENDS:
            h = self.features[start:end](h)
            out.append(h)
            start = end
        return out

    def forward(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        dtype = self.features[0].weight.dtype
        total = 0.0
        for a, b in zip(self._taps(inputs.to(dtype)), self._taps(recon.to(dtype)), strict=True):
            a = a.float() / (a.float().norm(dim=1, keepdim=True) + 1e-10)
            b = b.float() / (b.float().norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((a - b) ** 2).sum(dim=1).mean(dim=(1, 2))
        return total / len(SLICE_ENDS)
