"""The KL autoencoder: shapes, diffusers AutoencoderKL layout both ways, the latent scaling factor
measured from data and restored by `load_image_tokenizer`, and objective=klae through the engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data_pipeline.columns import PIXELS
from data_pipeline.config import to_yaml
from trainer.config import KlaeTrainSection, TrainConfig
from trainer.models.klae import (
    SCALE_KEY,
    Klae,
    KlaeConfig,
    KlaeTokenizer,
    compute_kl,
    compute_scaling_factor,
    diffusers_config,
)
from trainer.objectives.klae import KlaeObjective
from trainer.pretrained.image_tokenizers import load_image_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = dict(image_size=16, block_out_channels=[8, 16, 16], norm_num_groups=4, latent_channels=4)


def tiny_cfg(**kw) -> KlaeConfig:
    return KlaeConfig(**{**TINY, **kw})


def export_dir(path: Path, model: torch.nn.Module, cfg: KlaeConfig, scale: float) -> Path:
    """What the final checkpoint holds for objective=klae: model.safetensors + config.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file({**state, SCALE_KEY: torch.tensor(scale)}, str(path / "model.safetensors"))
    train_cfg = TrainConfig(name="klae-test", objective="klae", klae=cfg)
    (path / "config.yaml").write_text(to_yaml(train_cfg))
    return path


def test_encode_decode_shapes_and_dtypes(one_thread):
    torch.manual_seed(0)
    tok = KlaeTokenizer(tiny_cfg(), scaling_factor=0.5).eval()
    assert (tok.downsample, tok.latent_channels, tok.discrete) == (4, 4, False)
    z = tok.encode(torch.rand(2, 3, 16, 24))
    assert z.dtype == torch.float32 and z.shape == (2, 4, 4, 6)
    x = tok.decode(z)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 24)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert tok.describe() == {
        "kind": "klae",
        "fingerprint": "",
        "downsample": 4,
        "latent_channels": 4,
        "scaling_factor": 0.5,
    }
    with pytest.raises(ValueError, match="multiples of 4"):
        tok.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match="must be float"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents \(B, 4, h, w\)"):
        tok.decode(torch.zeros(1, 3, 4, 4))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"norm_num_groups 4 must divide .* \(not 6\)"):
        tiny_cfg(block_out_channels=[8, 6])
    with pytest.raises(ValueError, match="image_size 18 is not a multiple of the downsampling"):
        tiny_cfg(image_size=18)
    with pytest.raises(ValueError, match="recon_loss"):
        KlaeTrainSection(recon_loss="l2")


def test_exported_state_dict_loads_strictly_into_diffusers(tmp_path, one_thread):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Klae(cfg)
    tok = load_image_tokenizer(str(export_dir(tmp_path / "tok", model, cfg, scale=0.37)))
    assert isinstance(tok, KlaeTokenizer) and tok.scaling_factor == pytest.approx(0.37)
    assert len(tok.fingerprint) == 64

    state = load_file(str(tmp_path / "tok" / "model.safetensors"))
    state.pop(SCALE_KEY)
    vae = AutoencoderKL(**diffusers_config(cfg, scaling_factor=0.37)).eval()
    vae.load_state_dict(state, strict=True)

    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref_z = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        ref_x = ((vae.decode(ref_z / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    z = tok.encode(x)
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(tok.decode(z), ref_x)


def test_diffusers_directory_loads_through_load_image_tokenizer(tmp_path, one_thread):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    cfg = tiny_cfg(layers_per_block=2, mid_block_attention=False)
    vae = AutoencoderKL(**diffusers_config(cfg, scaling_factor=0.2)).eval()
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)  # SD's `vae/` layout
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    tok = load_image_tokenizer(str(tmp_path / "vae"))
    assert isinstance(tok, KlaeTokenizer) and tok.scaling_factor == pytest.approx(0.2)
    assert tok.cfg.layers_per_block == 2 and not tok.cfg.mid_block_attention

    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref_z = vae.encode(x * 2 - 1).latent_dist.mean * 0.2
        ref_x = ((vae.decode(ref_z / 0.2).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(tok.encode(x), ref_z)
    torch.testing.assert_close(tok.decode(ref_z), ref_x)

    # A VAE outside the layout is refused by key, naming the file.
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "use_quant_conv": False}))
    with pytest.raises(ValueError, match=r"vae/config.json: use_quant_conv=False is not supported"):
        load_image_tokenizer(str(tmp_path / "vae"))


def test_missing_scaling_factor_is_an_error(tmp_path):
    cfg = tiny_cfg()
    d = export_dir(tmp_path / "tok", Klae(cfg), cfg, scale=1.0)
    state = load_file(str(d / "model.safetensors"))
    state.pop(SCALE_KEY)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="no 'scaling_factor' tensor"):
        load_image_tokenizer(str(d))


def test_compute_kl_and_scaling_factor_match_closed_forms():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ref = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).kl()
    torch.testing.assert_close(compute_kl(mean, logvar), ref)

    values = torch.randn(10_000, dtype=torch.float64) * 3.0 + 1.0
    scale = compute_scaling_factor(
        values.numel(), float(values.sum()), float(values.square().sum())
    )
    assert scale == pytest.approx(1.0 / float(values.std()), rel=1e-9)
    with pytest.raises(ValueError, match="variance"):
        compute_scaling_factor(4, 8.0, 16.0)  # four equal values


def test_objective_scaling_factor_gives_unit_std_latents(tmp_path, one_thread):
    """The objective keeps its first `scale_batches` micro-batches; at export it measures the
    factor on them with the final weights; the restored tokenizer's latents have unit std there."""
    torch.manual_seed(0)
    cfg = TrainConfig(
        name="t", objective="klae", klae=tiny_cfg(), klae_train=KlaeTrainSection(scale_batches=2)
    )
    objective = KlaeObjective(cfg)
    model = objective.build_model()
    engine = SimpleNamespace(module=model)

    def fake_engine(x):  # DeepSpeed's engine forward calls the module
        return model(x)

    batches = [
        {PIXELS: torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)} for _ in range(3)
    ]
    for batch in batches:
        loss, metrics = objective.loss(fake_engine, batch)
        assert torch.isfinite(loss) and set(metrics) == {"recon_loss", "kl", "psnr", "latent_std"}
    assert len(objective._scale_batches) == 2  # only the first two are kept
    initial = objective.measure_scaling_factor(engine)
    with torch.no_grad():  # "training" changes the weights: the factor must use the final ones
        model.quant_conv.weight.mul_(5.0)
        model.quant_conv.bias.mul_(5.0)
    scale = objective.measure_scaling_factor(engine)
    assert scale == pytest.approx(initial / 5.0, rel=1e-4)  # the posterior means grew 5x
    tok = load_image_tokenizer(str(export_dir(tmp_path / "tok", model, cfg.klae, scale)))
    kept = torch.cat([b[PIXELS] for b in batches[:2]]).permute(0, 3, 1, 2).float() / 255
    assert float(tok.encode(kept).std()) == pytest.approx(1.0, abs=1e-3)
    assert float(tok.encode(batches[2][PIXELS].permute(0, 3, 1, 2).float() / 255).std()) != 1.0


def test_log_images_grid(one_thread):
    cfg = TrainConfig(name="t", objective="klae", klae=tiny_cfg())
    objective = KlaeObjective(cfg)
    model = objective.build_model()
    engine = SimpleNamespace(module=model.eval())
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    grid = objective.log_images(engine, {PIXELS: images})["recon"]
    assert grid.dtype == np.uint8 and grid.shape == (32, 48, 3)
    np.testing.assert_array_equal(grid[:16, 16:32], images[1].numpy())  # top row: originals
    assert np.abs(grid[16:].astype(int) - grid[:16]).mean() > 1  # bottom: reconstructions


@pytest.mark.slow
def test_klae_trains_on_digits_and_exports_a_tokenizer(ray_local, tmp_path):
    from data_pipeline.config import load_config
    from data_pipeline.digits import DigitsConfig, build_digits
    from trainer.launch import fit
    from trainer.recon import load_split_images, pixels_to_unit

    build_digits(DigitsConfig(out=str(tmp_path / "digits"), photos=0), log=lambda *_: None)
    # 180 val digits / 2 ranks / batch 16 = 5 batches per rank per epoch: all of them (160
    # images) set the scaling factor, so the restored tokenizer can be checked on that data.
    cfg = load_config(
        TrainConfig,
        REPO / "jobs/configs/klae_digits.yaml",
        [
            "name=klae",
            f"checkpoint.storage_path={tmp_path}",
            f"data.path={tmp_path}/digits/val",
            "steps=9",
            "log_every=3",
            "data.batch_size=16",
            "klae_train.scale_batches=5",
            "optimizer.warmup_steps=2",
            "failure_max_retries=0",
        ],
    )
    result = fit(cfg)
    assert result.error is None, result.error
    rows = [json.loads(line) for line in (tmp_path / "klae/tensorboard/metrics.jsonl").open()]
    recon = [r["recon_loss"] for r in rows]
    assert [r["step"] for r in rows] == [3, 6, 9]
    assert recon[-1] < 0.8 * recon[0], recon  # the reconstruction loss falls
    assert rows[-1]["psnr"] > rows[0]["psnr"] and rows[-1]["latent_std"] > 0
    grids = sorted(p.name for p in (tmp_path / "klae/images").glob("*.png"))
    assert grids == [f"recon_step{s:08d}.png" for s in (3, 6, 9)]  # the log_images hook

    tok = load_image_tokenizer(str(tmp_path / "klae"))  # the run dir: newest exported checkpoint
    assert isinstance(tok, KlaeTokenizer) and tok.downsample == 4
    stored = load_file(str(Path(result.checkpoint.path) / "model.safetensors"))[SCALE_KEY]
    assert tok.scaling_factor == pytest.approx(float(stored)) and tok.scaling_factor != 1.0
    images = load_split_images(str(tmp_path / "digits"), "val")
    latents = tok.encode(pixels_to_unit(images))
    assert latents.shape == (180, 4, 8, 8)
    assert float(latents.std()) == pytest.approx(1.0, abs=0.1)  # bf16 engine vs fp32 tokenizer
