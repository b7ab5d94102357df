"""VQGAN: taming-transformers layout equivalence, tokenizer API, converter, and the objective
through the one engine on the digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline.columns import PIXELS
from data_pipeline.config import load_config
from trainer.config import TrainConfig, VqganTrainSection
from trainer.models.discriminator import (
    DISC_PREFIX,
    NLayerDiscriminator,
    compute_adaptive_weight,
    compute_conv_weight_grads,
)
from trainer.models.image_tokenizer import compute_code_usage
from trainer.models.vqgan import (
    Vqgan,
    VqganConfig,
    VqganTokenizer,
)
from trainer.pretrained.converters import convert_taming_vqgan
from trainer.pretrained.image_tokenizers import load_image_tokenizer

REPO = Path(__file__).resolve().parents[2]

# A small taming ddconfig with every feature: 3 levels (f=4), attention at 8, channel changes.
TINY = VqganConfig(
    image_size=16,
    ch=32,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[8],
    z_channels=32,
    n_embed=64,
    embed_dim=8,
)
TINY_TRAIN = VqganTrainSection(disc_ndf=16, disc_num_layers=2)  # its discriminator's shape


def taming_reference(cfg: VqganConfig, train: VqganTrainSection, seed: int = 0):
    """taming's own modules (pure torch) with random weights, as a `VQModel` state dict holds
    them, plus the loss module's discriminator."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.discriminator.model import NLayerDiscriminator as TamingDisc
    from taming.modules.vqvae.quantize import VectorQuantizer

    torch.manual_seed(seed)
    dd = cfg.ddconfig()
    ref = torch.nn.Module()
    ref.encoder = Encoder(**dd)
    ref.decoder = Decoder(**dd)
    ref.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)
    ref.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
    ref.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
    with torch.no_grad():  # a codebook spread like trained encoder outputs, not taming's tiny init
        ref.quantize.embedding.weight.normal_()
    disc = TamingDisc(input_nc=3, ndf=train.disc_ndf, n_layers=train.disc_num_layers)
    return ref.eval(), disc.eval()


def test_taming_state_dict_loads_strictly_and_matches(one_thread):
    ref, ref_disc = taming_reference(TINY, TINY_TRAIN)
    tok = VqganTokenizer.from_state(TINY, ref.state_dict()).eval()
    images = torch.rand(3, 3, 16, 16)
    x = images * 2 - 1
    with torch.no_grad():
        h = ref.quant_conv(ref.encoder(x))
        z_q, _, (_, _, idx) = ref.quantize(h)
        ref_recon = ref.decoder(ref.post_quant_conv(z_q))
    codes = tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, 4, 4)
    assert torch.equal(codes.reshape(-1), idx.reshape(-1))  # identical codes
    recon = tok.decode(codes)
    expected = ((ref_recon + 1) / 2).clamp(0, 1)
    assert recon.dtype == torch.float32 and recon.shape == images.shape
    torch.testing.assert_close(recon, expected, atol=1e-5, rtol=1e-4)
    # Our discriminator has taming's keys; the same weights give the same logits.
    disc = NLayerDiscriminator(3, TINY_TRAIN.disc_ndf, TINY_TRAIN.disc_num_layers).eval()
    disc.load_state_dict(ref_disc.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(disc(x), ref_disc(x))


def test_loss_keys_are_ignored_and_a_wrong_layout_names_the_key(one_thread):
    ref, disc = taming_reference(TINY, TINY_TRAIN)
    sd = ref.state_dict()
    full = {**sd, **{DISC_PREFIX + k: v for k, v in disc.state_dict().items()}}
    full["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    VqganTokenizer.from_state(TINY, full)  # loss.* never an error
    broken = dict(sd)
    broken["encoder.conv_input.weight"] = broken.pop("encoder.conv_in.weight")
    with pytest.raises(ValueError, match="missing key 'encoder.conv_in.weight'") as e:
        VqganTokenizer.from_state(TINY, broken)
    assert "unexpected key 'encoder.conv_input.weight'" in str(e.value)


def test_straight_through_gradient_reaches_the_encoder(one_thread):
    torch.manual_seed(0)
    model = Vqgan(TINY)
    out = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out["codes"].shape == (2, 4, 4) and out["recon"].shape == (2, 3, 16, 16)
    out["recon"].square().mean().backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # The reconstruction alone does not move the codebook: that is the codebook loss's job.
    assert model.quantize.embedding.weight.grad is None


def test_code_usage_and_adaptive_weight(one_thread):
    used, perplexity = compute_code_usage(torch.tensor([0, 0, 1, 1]), 8)
    assert used.item() == pytest.approx(2 / 8) and perplexity.item() == pytest.approx(2.0)
    # The adaptive weight from output gradients equals taming's autograd.grad at the weight.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 3, 3, padding=1)
    h = torch.randn(2, 8, 6, 6)
    target = torch.randn(2, 3, 6, 6)
    recon = conv(h)
    nll, g = (recon - target).abs().mean(), -(recon**3).mean()
    ref = [torch.autograd.grad(loss, conv.weight, retain_graph=True)[0] for loss in (nll, g)]
    r = recon.detach().requires_grad_(True)
    ours = compute_conv_weight_grads([(r - target).abs().mean(), -(r**3).mean()], r, h, conv)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    weight = compute_adaptive_weight(*ours, disc_weight=0.8)
    expected = ref[0].norm() / (ref[1].norm() + 1e-4) * 0.8
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5) and weight > 0


def write_taming_checkpoint(tmp_path: Path, cfg: VqganConfig, train: VqganTrainSection):
    ref, disc = taming_reference(cfg, train)
    sd = {**ref.state_dict(), **{DISC_PREFIX + k: v for k, v in disc.state_dict().items()}}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 0}, ckpt)
    doc = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": cfg.embed_dim,
                "n_embed": cfg.n_embed,
                "ddconfig": cfg.ddconfig(),
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {
                        "disc_conditional": False,
                        "disc_in_channels": 3,
                        "disc_start": 250001,
                        "disc_weight": 0.8,
                        "codebook_weight": 1.0,
                        "disc_ndf": train.disc_ndf,
                        "disc_num_layers": train.disc_num_layers,
                    },
                },
            },
        }
    }
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(doc))
    return ref, sd, ckpt, config


def test_convert_taming_round_trip(tmp_path, one_thread):
    from safetensors.torch import load_file

    ref, sd, ckpt, config = write_taming_checkpoint(tmp_path, TINY, TINY_TRAIN)
    info = convert_taming_vqgan(str(ckpt), str(config), str(tmp_path / "out"), keep_loss=True)
    assert info["vocab_size"] == 64 and info["downsample"] == 4 and info["kept_loss_keys"] > 0
    tok = load_image_tokenizer(str(tmp_path / "out"))
    assert tok.kind == "vqgan" and tok.grid(16) == 4 and len(tok.fingerprint) == 64
    assert tok.describe()["vocab_size"] == 64
    exported = load_config(TrainConfig, tmp_path / "out" / "config.yaml", require=False)
    assert exported.vqgan_train.disc_start == 250001  # lossconfig.params carried over
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        _, _, (_, _, idx) = ref.quantize(ref.quant_conv(ref.encoder(images * 2 - 1)))
    assert torch.equal(tok.encode(images).reshape(-1), idx.reshape(-1))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(saved[k], v.float()) for k, v in sd.items() if "num_batches" not in k)
    # `vqgan_train.init_from` starts training from it: autoencoder and discriminator.
    from dataclasses import replace

    from trainer.objectives.vqgan import VqganObjective

    init = replace(TINY_TRAIN, init_from=str(tmp_path / "out"))
    cfg = TrainConfig(name="ft", objective="vqgan", vqgan=TINY, vqgan_train=init)
    parts = VqganObjective(cfg).build_parts()
    assert torch.equal(parts["model"].decoder.conv_out.weight, sd["decoder.conv_out.weight"])
    assert torch.equal(parts["discriminator"].main[0].weight, sd[DISC_PREFIX + "main.0.weight"])
    # Without keep_loss the discriminator is dropped.
    convert_taming_vqgan(str(ckpt), str(config), str(tmp_path / "ae"))
    assert not any(k.startswith("loss.") for k in load_file(str(tmp_path / "ae/model.safetensors")))


def test_convert_refuses_wrong_layout_and_pickled_code(tmp_path, one_thread):
    import argparse

    _, sd, _, config = write_taming_checkpoint(tmp_path, TINY, TINY_TRAIN)
    sd = dict(sd)
    sd["quantize.codebook.weight"] = sd.pop("quantize.embedding.weight")
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="missing key 'quantize.embedding.weight'"):
        convert_taming_vqgan(str(tmp_path / "bad.ckpt"), str(config), str(tmp_path / "o1"))
    # A Lightning checkpoint that pickles objects (hparams as a Namespace) is refused by name.
    torch.save({"state_dict": {}, "hparams": argparse.Namespace(lr=1.0)}, tmp_path / "pk.ckpt")
    with pytest.raises(ValueError, match="argparse.Namespace"):
        convert_taming_vqgan(str(tmp_path / "pk.ckpt"), str(config), str(tmp_path / "o2"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from data_pipeline.digits import DigitsConfig, build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=str(out), photos=0), log=lambda *_: None)
    return out / "train"


def vqgan_train_config(storage: Path, name: str, digits: Path, *overrides: str):
    """The demo's config, shrunk: 16 px images (f=4 -> 4x4 codes of 64), small batches."""
    return load_config(
        TrainConfig,
        REPO / "jobs/configs/vqgan_digits.yaml",
        [
            f"name={name}",
            f"checkpoint.storage_path={storage}",
            f"data.path={digits}",
            "failure_max_retries=0",
            "vqgan.image_size=16",
            "vqgan.ch_mult=[1, 1, 2]",
            "vqgan.n_embed=64",
            "vqgan.z_channels=32",
            "vqgan.embed_dim=8",
            "vqgan_train.disc_ndf=16",
            "data.batch_size=8",
            "optimizer.warmup_steps=2",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_vqgan_trains_on_digits_with_gan_and_exports_a_tokenizer(ray_local, tmp_path, digits):
    """2 workers, the GAN switching on mid-run: reconstruction falls, codebook statistics and the
    discriminator's losses are reported, reconstruction grids are written, and the exported
    checkpoint is a tokenizer directory (taming layout + loss.discriminator.*)."""
    from safetensors.torch import load_file

    from trainer.launch import fit

    cfg = vqgan_train_config(
        tmp_path,
        "vq",
        digits,
        "steps=12",
        "log_every=4",
        "checkpoint.every_steps=4",
        "vqgan_train.disc_start=8",
        "vqgan_train.dead_code_every=4",
    )
    result = fit(cfg)
    assert result.error is None, result.error
    rows = [m for _, m in sorted(result.best_checkpoints, key=lambda t: t[1]["step"])]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["rec_loss"] < 0.7 * rows[0]["rec_loss"], [r["rec_loss"] for r in rows]
    assert rows[-1]["psnr"] > rows[0]["psnr"]
    assert 0 < rows[-1]["codebook_used"] <= 1 and rows[-1]["code_perplexity"] > 1
    assert "d_loss" not in rows[1] and rows[1]["g_loss"] == 0  # the GAN is off before step 8
    last = rows[-1]
    assert last["d_loss"] > 0 and last["d_weight"] > 0 and "grad_norm_discriminator" in last
    pngs = sorted(p.name for p in (tmp_path / "vq" / "images").iterdir())
    assert pngs == [f"reconstructions_step{s:08d}.png" for s in (4, 8, 12)]

    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "ds").is_dir() and (ckpt / "ds_discriminator").is_dir()
    weights = load_file(str(ckpt / "model.safetensors"))
    assert "quantize.embedding.weight" in weights and "loss.discriminator.main.0.weight" in weights
    tok = load_image_tokenizer(str(tmp_path / "vq"))  # the run: newest exported checkpoint
    images = torch.rand(2, 3, 16, 16)
    codes = tok.encode(images)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.int64
    assert tok.decode(codes).shape == (2, 3, 16, 16)


def test_vgg_perceptual_loss_from_a_local_torchvision_file(tmp_path, one_thread):
    from torchvision.models.vgg import cfgs, make_layers

    from trainer.models.perceptual import VggPerceptualLoss

    torch.manual_seed(0)
    features = make_layers(cfgs["D"], batch_norm=False)  # torchvision vgg16().features
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = VggPerceptualLoss(str(path))
    assert not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).abs().max() < 1e-6
    value = loss(x, recon)
    assert value.shape == (2,) and (value > 0).all()
    value.sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="no 'features.\\*' keys"):
        VggPerceptualLoss(str(tmp_path / "wrong.pth"))


def test_dead_codes_are_reseeded_from_encoder_outputs(tmp_path, one_thread):
    """Codes unused over `dead_code_every` steps get encoder outputs of the batch; used ones
    stay. (Single process: the engine's fp32 master copy is exercised by the Ray tests.)"""
    from types import SimpleNamespace

    from trainer.objectives.vqgan import VqganObjective

    cfg = vqgan_train_config(tmp_path, "dead", tmp_path, "vqgan_train.dead_code_every=2")
    objective = VqganObjective(cfg)
    torch.manual_seed(0)
    parts = objective.build_parts()
    engines = {name: SimpleNamespace(module=m) for name, m in parts.items()}
    batch = {PIXELS: torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)}
    objective.usage.counts[:10] = 5  # codes 0..9 were used, the rest never
    before = parts["model"].quantize.embedding.weight.detach().clone()
    objective.on_step(2)
    assert objective.maybe_restart_dead_codes(engines, batch) == cfg.vqgan.n_embed - 10
    after = parts["model"].quantize.embedding.weight.detach()
    assert torch.equal(after[:10], before[:10]) and not torch.equal(after[10:], before[10:])
    with torch.no_grad():
        z = parts["model"].encode_pre_quant(objective.images(engines["model"], batch))
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    assert torch.isin(after[10:], z).all()  # every new row is one of the encoder outputs
    assert objective.maybe_restart_dead_codes(engines, batch) == 0  # once per step
    assert objective.usage.counts.sum() == 0  # counting starts again
