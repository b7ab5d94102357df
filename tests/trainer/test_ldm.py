"""Latent diffusion: the math against its papers and diffusers, the U-Net presets, the sampler,
and the `ldm` objective on Ray Train + DeepSpeed (ZeRO-2/3, EMA, kill + resume, export)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.diffusion import (
    NoiseSchedule,
    compute_caption_drop,
    compute_guided,
    compute_min_snr_weights,
    compute_noisy,
    compute_target,
)
from trainer.ema import compute_ema, compute_ema_decay, deal_params
from trainer.models.unet import Unet, UnetConfig, unet_preset

REPO = Path(__file__).resolve().parents[2]


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NoiseSchedule().scheduler_config("epsilon"))


def test_schedule_is_diffusers_sd_schedule():
    ab = NoiseSchedule().alphas_cumprod()
    # SD's scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(ab.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_closed_form_noising_matches_diffusers_add_noise():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    sched = ddpm()
    ours = compute_noisy(z0, eps, t, NoiseSchedule().alphas_cumprod())
    assert torch.allclose(ours, sched.add_noise(z0, eps, t), atol=1e-6)


def test_eps_and_v_targets():
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 100, 600, 999])
    ab = NoiseSchedule().alphas_cumprod()
    assert torch.equal(compute_target("epsilon", z0, eps, t, ab), eps)
    v = compute_target("v_prediction", z0, eps, t, ab)
    assert torch.allclose(v, ddpm().get_velocity(z0, eps, t), atol=1e-6)
    # Salimans & Ho: with z_t = a z0 + s eps and v = a eps - s z0 (a^2 + s^2 = 1), z0 = a z_t - s v
    a = ab[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(a * compute_noisy(z0, eps, t, ab) - s * v, z0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        compute_target("sample", z0, eps, t, ab)


def test_min_snr_weights_follow_the_paper():
    ab = NoiseSchedule().alphas_cumprod()
    t = torch.tensor([0, 200, 999])
    snr = ab[t] / (1 - ab[t])
    w_eps = compute_min_snr_weights("epsilon", t, ab, 5.0)
    assert torch.allclose(w_eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    w_v = compute_min_snr_weights("v_prediction", t, ab, 5.0)
    assert torch.allclose(w_v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert w_eps[0] < 1 and w_eps[-1] == 1  # high-SNR (small t) steps are down-weighted
    assert torch.equal(compute_min_snr_weights("epsilon", t, ab, 0.0), torch.ones(3))


def test_caption_dropout_rate_and_determinism():
    n, p = 20_000, 0.1
    drop = compute_caption_drop(n, p, torch.Generator().manual_seed(3))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int(drop.sum()) - n * p) < 4 * sd  # binomial bounds
    again = compute_caption_drop(n, p, torch.Generator().manual_seed(3))
    assert torch.equal(drop, again)
    assert not torch.equal(drop, compute_caption_drop(n, p, torch.Generator().manual_seed(4)))
    assert not compute_caption_drop(100, 0.0).any() and compute_caption_drop(100, 1.0).all()
    with pytest.raises(ValueError, match="caption_dropout"):
        compute_caption_drop(4, 1.5)


def test_guidance_combination():
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(compute_guided(uncond, cond, 1.0), cond)  # s = 1: the conditional alone
    assert torch.allclose(compute_guided(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))
    assert torch.equal(compute_guided(uncond, cond, 0.0), uncond)


def test_ema_math():
    w = [torch.full((3,), float(v)) for v in (1.0, 2.0, 4.0)]
    ema = {"w": torch.zeros(3)}
    expected = 0.0
    for i, wi in enumerate(w):
        d = compute_ema_decay(i, 0.5)
        compute_ema(ema, {"w": wi}, d)
        expected = d * expected + (1 - d) * float(wi[0])
    assert torch.allclose(ema["w"], torch.full((3,), expected))
    assert compute_ema_decay(0, 0.9999) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert compute_ema_decay(10**7, 0.9999) == 0.9999
    # Largest first to the least-loaded rank: 100 -> r0, 50 -> r1, 50 -> r1, 2 -> r0 (tie: lower
    # rank), 1 -> r1; every parameter has exactly one owner.
    assert deal_params([100, 1, 50, 50, 2], 2) == [0, 1, 1, 1, 0]
    assert deal_params([5, 5], 1) == [0, 0]


def test_presets_and_config_errors():
    with torch.device("meta"):
        sd2 = Unet(unet_preset("sd2base"))
        sdxl = Unet(unet_preset("sdxl"))
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724  # SD-2-base's U-Net
    n_xl = sum(p.numel() for p in sdxl.parameters())
    assert 2.5e9 < n_xl < 2.6e9, n_xl  # SDXL's 2.567B less its micro-conditioning embedding
    assert unet_preset("sd2base").cross_attention_dim == 1024
    with pytest.raises(ValueError, match="attention_levels"):
        UnetConfig(attention_levels=[True]).check()
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet_preset("sd3")


def test_config_preset_and_dataset_checks():
    from data_pipeline.config import ConfigError, load_config
    from data_pipeline.token_dataset import check_latent_compatible
    from trainer.config import TrainConfig

    cfg = load_config(TrainConfig, REPO / "jobs/configs/ldm_digits.yaml", ["unet.layers_per_block=1"])
    assert cfg.unet.cross_attention_dim == 128 and cfg.unet.layers_per_block == 1
    with pytest.raises(ConfigError, match="ldm.prediction_type"):
        load_config(TrainConfig, None, ["name=x", "ldm.prediction_type=sample"])
    manifest = {"latent_shape": [4, 8, 8], "text_embedding_shape": [16, 128], "scaling_factor": 0.9}
    check_latent_compatible(manifest, latent_shape=[4, 8, 8], text_width=128, scaling_factor=0.9)
    with pytest.raises(ValueError, match=r"latent_shape=\[4, 8, 8\].*\[4, 16, 16\]"):
        check_latent_compatible(manifest, latent_shape=[4, 16, 16], text_width=128)
    with pytest.raises(ValueError, match="cross_attention_dim=1024"):
        check_latent_compatible(manifest, latent_shape=[4, 8, 8], text_width=1024)
    with pytest.raises(ValueError, match="scaling_factor=0.9.*ldm.scaling_factor=0.18215"):
        check_latent_compatible(
            manifest, latent_shape=[4, 8, 8], text_width=128, scaling_factor=0.18215
        )


def test_ddim_matches_diffusers_loop_and_is_deterministic(one_thread):
    """Our sampler vs the loop diffusers documents (set_timesteps, scale_model_input, CFG, step)
    on the same U-Net and scheduler; DDIM with eta=0 is deterministic for a seed."""
    from diffusers import DDIMScheduler

    from trainer.sampling.ldm import build_scheduler, sample_latents

    torch.manual_seed(0)
    model = Unet(UnetConfig()).eval()
    text, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    uncond, umask = torch.zeros(5, 32), torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    config = NoiseSchedule().scheduler_config("epsilon")

    def ours(seed, guidance=4.0):
        return sample_latents(
            model, build_scheduler("ddim", config), text, mask, uncond, umask,
            latent_shape=(4, 8, 8), steps=6, guidance=guidance,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    a = ours(7)
    assert torch.equal(a, ours(7)) and not torch.equal(a, ours(8))

    sched = DDIMScheduler(**config, set_alpha_to_one=False)
    sched.set_timesteps(6)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    latents = latents * sched.init_noise_sigma
    hidden = torch.cat([uncond.expand(2, -1, -1), text])
    hmask = torch.cat([umask.expand(2, -1), mask]).float()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            noise = model.unet(x, t, encoder_hidden_states=hidden, encoder_attention_mask=hmask)
            noise_uncond, noise_text = noise.sample.chunk(2)
            noise_pred = noise_uncond + 4.0 * (noise_text - noise_uncond)
            latents = sched.step(noise_pred, t, latents).prev_sample
    assert torch.allclose(a, latents, atol=1e-5), (a - latents).abs().max()
    # DDPM draws its noise from the same generator: also reproducible
    ddpm_a = sample_latents(
        model, build_scheduler("ddpm", config), text, mask, uncond, umask,
        latent_shape=(4, 8, 8), steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    ddpm_b = sample_latents(
        model, build_scheduler("ddpm", config), text, mask, uncond, umask,
        latent_shape=(4, 8, 8), steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert torch.equal(ddpm_a, ddpm_b)


# --------------------------------------------------------------------------------------------
# The objective on Ray Train + DeepSpeed
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_latents(ray_local, tmp_path_factory):
    """`t2i tokenize recipe=ldm` on the bundled digits (val split, 180 images): a tiny random
    KL-AE's 4x8x8 latents + a tiny random open_clip text tower's 8 x 32 states."""
    from data_pipeline import token_dataset as T
    from data_pipeline.config import load_config
    from data_pipeline.digits import DigitsConfig, build_digits
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize
    from tests.trainer.sample_fixtures import LDM_TEXT_LEN, TEXT_ENCODER, make_klae

    root = tmp_path_factory.mktemp("ldm-data")
    build_digits(DigitsConfig(out=str(root / "digits"), photos=0), log=lambda *_: None)
    (root / "tiny_clip.json").write_text(json.dumps(TEXT_ENCODER))
    cfg = load_config(TokenizeConfig, None, [
        f"input={root / 'digits/val'}", f"output={root / 'latents'}", "recipe=ldm",
        "image_size=32", "text_tokenizer.kind=open_clip", f"text_tokenizer.text_len={LDM_TEXT_LEN}",
        f"image_tokenizer.path={make_klae(root / 'klae')}", "image_tokenizer.batch_size=32",
        "text_encoder.model=tiny_clip", f"text_encoder.model_config={root / 'tiny_clip.json'}",
        "text_encoder.batch_size=32", "text_encoder.allow_random=true",
    ])  # fmt: skip
    manifest = run_tokenize(cfg, log=lambda *_: None)
    assert manifest["version"] == T.LATENT_VERSION and manifest["rows"] == 180
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_embedding_shape"] == [8, 32]
    uncond = T.read_empty_caption(fs_location(root / "latents"), manifest)
    assert uncond[T.TEXT_MASK].tolist() == [True, True] + [False] * 6  # <start> <end> pad...
    return root / "latents"


def fs_location(path):
    from data_pipeline import fs

    return fs.resolve(str(path))


def _fit(tmp_path, name, data, *overrides):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig
    from trainer.launch import fit

    cfg = load_config(
        TrainConfig,
        REPO / "jobs/configs/ldm_tiny.yaml",
        [f"name={name}", f"checkpoint.storage_path={tmp_path}", "engine.precision=fp32",
         "steps=6", "log_every=2", "checkpoint.every_steps=1", "checkpoint.keep=0",
         "data.source=tokens", f"data.path={data}", "data.batch_size=16", "ldm.sample_steps=2",
         "failure_max_retries=0", *overrides],
    )  # fmt: skip
    result = fit(cfg)
    assert result.error is None, result.error
    return tmp_path / name


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint (DeepSpeed's own consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag="state")


def _ema(ckpt: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reassemble the full EMA from the per-rank shards (ZeRO-3: flat partitions in rank order;
    ZeRO-0/1/2: whole parameters, each held by one rank)."""
    from safetensors.torch import load_file

    shards = [load_file(str(p)) for p in sorted(ckpt.glob("ema_rank*.safetensors"))]
    full = {}
    for name, shape in shapes.items():
        held = [s[name] for s in shards if name in s]
        if len(held) == 1 and held[0].shape == shape:
            full[name] = held[0]
        else:
            full[name] = torch.cat([h.reshape(-1) for h in held])[: shape.numel()].reshape(shape)
    return full


def _check_ema_recursion(run: Path, steps: int, decay: float) -> dict[str, torch.Tensor]:
    """Each checkpoint's EMA = d * previous EMA + (1 - d) * that step's fp32 weights: the
    single-process EMA of the same weights, computed here from DeepSpeed's consolidation."""
    ckpts = [run / "checkpoints" / f"step_{s:08d}" for s in range(1, steps + 1)]
    weights = [_weights(c) for c in ckpts]
    shapes = {k: v.shape for k, v in weights[0].items()}
    emas = [_ema(c, shapes) for c in ckpts]
    for k in range(1, steps):
        expected = {n: e.clone() for n, e in emas[k - 1].items()}
        compute_ema(expected, weights[k], compute_ema_decay(k, decay))
        for n in shapes:
            torch.testing.assert_close(emas[k][n], expected[n], rtol=0, atol=1e-6)
    return emas[-1]


@pytest.mark.slow
def test_ldm_trains_under_zero3_and_zero2_with_ema_resume_and_diffusers_export(
    digits_latents, tmp_path
):
    """On the digits latents (tokenized above), 2 workers: the loss falls under ZeRO-3 and
    ZeRO-2; the sharded EMA is the single-process EMA; a killed worker resumes bit-exactly."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    clean = _fit(tmp_path, "z3", digits_latents)
    # The same run, one worker hard-killed after step 3: resumes from the step-3 checkpoint.
    killed = _fit(tmp_path, "z3kill", digits_latents, "faults.kill_at_steps=[3]",
                  f"faults.marker_dir={tmp_path}/killed", "failure_max_retries=1")  # fmt: skip
    zero2 = _fit(tmp_path, "z2", digits_latents, "engine.zero_stage=2")
    assert (tmp_path / "killed").exists()

    for run in (clean, zero2):  # the loss falls under ZeRO-3 and ZeRO-2
        rows = [json.loads(x) for x in (run / "tensorboard/metrics.jsonl").open()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # logged at every checkpoint
        loss = [r["loss"] for r in rows]
        assert loss[-1] + loss[-2] < 0.9 * (loss[0] + loss[1]), loss
    # EMA under ZeRO-3 / ZeRO-2 sharding equals the single-process EMA of the same weights.
    ema3 = _check_ema_recursion(clean, 6, 0.99)
    _check_ema_recursion(zero2, 6, 0.99)

    final = "checkpoints/step_00000006"
    exported = load_file(str(clean / final / "model.safetensors"))
    assert set(exported) == set(ema3)
    for n in ema3:
        torch.testing.assert_close(exported[n], ema3[n], rtol=0, atol=0)
    # Killed and resumed: bit-identical final weights and EMA.
    for n, w in _weights(clean / final).items():
        assert torch.equal(w, _weights(killed / final)[n]), n
    for name in ("model.safetensors", "unet/diffusion_pytorch_model.safetensors"):  # EMA export
        assert (clean / final / name).read_bytes() == (killed / final / name).read_bytes(), name

    # The exported diffusers folder reloads with diffusers and predicts what our module does.
    from trainer.models.image_tokenizer import load_strict

    ours = Unet(UnetConfig())
    load_strict(ours, exported, what="ldm export", layout="Unet")
    theirs = UNet2DConditionModel.from_pretrained(str(clean / final / "unet")).eval()
    z, text = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = ours.eval()(z, t, text)
        got = theirs(z, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(clean / final / "vae"))  # the dataset's KL-AE
    assert vae.config.scaling_factor == pytest.approx(0.8)
    grids = sorted(p.name for p in (clean / "images").glob("samples_step*.png"))
    assert grids == [f"samples_step{s:08d}.png" for s in range(1, 7)]  # decoded DDIM samples
    info = json.loads((clean / final / "t2i_ldm.json").read_text())
    assert info["scaling_factor"] == pytest.approx(0.8) and info["text_embedding_shape"] == [8, 32]
    sched = json.loads((clean / final / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "scaled_linear"
    assert np.isfinite(float(next(iter(exported.values())).sum()))


def test_activation_checkpointing_recomputes_without_changing_gradients(one_thread):
    from trainer.engine import apply_activation_checkpointing

    torch.manual_seed(0)
    plain = Unet(UnetConfig()).train()
    ckpt = Unet(UnetConfig()).train()
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)  # the engine's hook: diffusers' own mechanism here
    assert ckpt.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    z, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([3, 700])
    for m in (plain, ckpt):
        m(z, t, text).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
