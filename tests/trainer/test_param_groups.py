"""Weight decay by parameter role (owning module type), not by name."""

import torch
import torch.nn as nn

from trainer.engine import param_groups
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.models.dvae import Conv2d
from trainer.models.klae import Klae, KlaeConfig


def decayed_names(model: nn.Module) -> tuple[set[str], set[str]]:
    groups = param_groups(model, 0.1)
    ids = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    names = {n for n, _ in model.named_parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)
    decay = {n for n, p in model.named_parameters() if id(p) in ids}
    return decay, names - decay


def test_kl_autoencoder_post_quant_conv_decays():
    """`post_quant_conv.weight` is a conv kernel: it decays (the old filter matched "pos")."""
    model = Klae(
        KlaeConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4)
    )
    decay, no_decay = decayed_names(model)
    assert "post_quant_conv.weight" in decay and "quant_conv.weight" in decay
    assert "post_quant_conv.bias" in no_decay
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    assert norms and all(f"{n}.weight" in no_decay for n in norms)


def test_roles_in_a_mixed_model():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_emb = nn.Embedding(8, 4)  # no decay: an embedding
            self.position_proj = nn.Linear(4, 4)  # decays: a matrix, whatever its name
            self.ln = nn.LayerNorm(4)
            self.rms = nn.RMSNorm(4)
            self.bn = nn.BatchNorm2d(4)
            self.conv = Conv2d(4, 4, 3)  # dVAE conv: raw kernel `w` decays, bias `b` not
            self.scale = nn.Parameter(torch.ones(()))
            self.head = nn.Linear(4, 8, bias=False)
            self.head.weight = self.pos_emb.weight  # tied: listed once, as its first owner

    decay, no_decay = decayed_names(Toy())
    assert decay == {"position_proj.weight", "conv.w"}
    assert "pos_emb.weight" in no_decay and "scale" in no_decay and "conv.b" in no_decay


def test_dalle_embeddings_and_norms_do_not_decay():
    model = DalleTransformer(DalleConfig())
    decay, no_decay = decayed_names(model)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.LayerNorm)):
            assert all(f"{name}.{p}" in no_decay for p, _ in m.named_parameters())
    assert decay and all(n.endswith("weight") for n in decay)
