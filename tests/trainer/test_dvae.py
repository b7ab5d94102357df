"""DALL-E's dVAE: shapes, the pure math (Gumbel relaxation, schedules, losses), argmax inference,
the fast code path, and objective=dvae through the one engine on the digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.models.dvae import (
    Dvae,
    DvaeConfig,
    DvaeTokenizer,
    compute_gumbel_softmax,
    compute_kl_to_uniform,
    compute_logit_laplace_nll,
    map_pixels,
    unmap_pixels,
)
from trainer.models.image_tokenizer import compute_code_usage, compute_psnr
from trainer.objectives.dvae import compute_gumbel_tau, compute_kl_weight
from trainer.recon import image_grid

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(n_hid=16, n_blk_per_group=1, n_init=16, vocab_size=64)


def tokenizer(**kw) -> DvaeTokenizer:
    torch.manual_seed(0)
    return DvaeTokenizer(DvaeConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("groups,side,grid", [(4, 32, 4), (3, 32, 8), (3, 24, 6), (1, 5, 5)])
def test_encode_decode_shapes_and_dtypes(one_thread, groups, side, grid):
    tok = tokenizer(group_count=groups, image_size=side if groups == 1 else 32)
    assert tok.downsample == 2 ** (groups - 1)
    images = torch.rand(2, 3, side, side)
    codes = tok.encode(images)
    assert codes.shape == (2, grid, grid) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    recon = tok.decode(codes)
    assert recon.shape == (2, 3, side, side) and recon.dtype == torch.float32
    assert 0 <= float(recon.min()) and float(recon.max()) <= 1


def test_bad_inputs_name_the_problem(one_thread):
    tok = tokenizer(group_count=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        tok.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="float"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="DvaeConfig.image_size 30"):
        DvaeConfig(image_size=30, group_count=3)
    with pytest.raises(ValueError, match="n_hid must be a multiple of 4"):
        DvaeConfig(n_hid=30)


def test_encode_is_deterministic_argmax_of_the_logits(one_thread):
    tok = tokenizer(group_count=3)
    images = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    first = tok.encode(images)
    torch.manual_seed(2)  # a different RNG state changes nothing: no noise at inference
    assert torch.equal(tok.encode(images), first)
    assert torch.equal(first, tok.logits(images).argmax(1))
    assert first.unique().numel() > 1


def test_decode_of_codes_equals_decoder_on_one_hot(one_thread):
    tok = tokenizer(group_count=3)
    codes = torch.randint(0, 64, (3, 8, 8))
    one_hot = F.one_hot(codes, 64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        reference = tok.decoder(one_hot)
        fast = tok.decoder.forward_codes(codes)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_training_model_and_tokenizer_share_one_state_dict_layout(one_thread):
    cfg = DvaeConfig(**SMALL, group_count=3)
    model = Dvae(cfg)
    tok = DvaeTokenizer.from_state(cfg, model.state_dict())
    assert list(tok.state_dict()) == list(model.state_dict())
    sd = model.state_dict()
    sd.pop("decoder.blocks.output.conv.b")
    with pytest.raises(ValueError, match="missing key 'decoder.blocks.output.conv.b'"):
        DvaeTokenizer.from_state(cfg, sd)


def test_flops_per_image_counts_every_convolution(one_thread):
    from torch.utils.flop_counter import FlopCounterMode

    model = Dvae(DvaeConfig(**SMALL, group_count=3, decoder_n_blk_per_group=2))
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, 32, 32), 1.0)
    assert model.flops_per_image() == counter.get_total_flops()


def test_gumbel_tau_schedule():
    tau = lambda s: compute_gumbel_tau(s, start=1.0, end=1 / 16, steps=100)  # noqa: E731
    assert tau(0) == 1.0
    assert tau(50) == pytest.approx((1 + 1 / 16) / 2)  # cosine midpoint
    assert tau(100) == tau(10_000) == 1 / 16
    values = [tau(s) for s in range(101)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert compute_gumbel_tau(5, start=2.0, end=0.5, steps=0) == 0.5


def test_kl_weight_warmup():
    beta = lambda s: compute_kl_weight(s, weight=6.6, warmup_steps=10)  # noqa: E731
    assert beta(0) == 0.0 and beta(5) == pytest.approx(3.3) and beta(10) == beta(99) == 6.6
    assert compute_kl_weight(0, weight=2.0, warmup_steps=0) == 2.0


def test_gumbel_softmax_relaxes_towards_the_noisy_argmax():
    logits = torch.randn(2, 16, 3, 3)
    soft = compute_gumbel_softmax(logits, 1.0)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 3, 3))
    torch.manual_seed(0)
    cold = compute_gumbel_softmax(logits, 1e-3)
    torch.manual_seed(0)
    gumbel = -torch.log(torch.empty_like(logits).exponential_())  # the same noise draw
    assert torch.equal(cold.argmax(1), (logits + gumbel).argmax(1))
    assert float(cold.max(1).values.min()) > 0.99  # nearly one-hot
    # Noise matters at tau = 1: samples differ from the plain argmax somewhere.
    draws = torch.stack([compute_gumbel_softmax(logits, 1.0).argmax(1) for _ in range(20)])
    assert (draws != logits.argmax(1)).any()


def test_kl_to_uniform():
    assert float(compute_kl_to_uniform(torch.zeros(2, 8, 4, 4))) == pytest.approx(0, abs=1e-6)
    peaked = torch.full((1, 8, 1, 1), -1e4)
    peaked[:, 3] = 0
    assert float(compute_kl_to_uniform(peaked)) == pytest.approx(math.log(8), rel=1e-5)


def test_logit_laplace_nll_is_the_density_of_the_paper():
    images = torch.rand(2, 3, 4, 4)
    stats = torch.randn(2, 6, 4, 4)
    x = map_pixels(images)
    mu, log_b = stats[:, :3], stats[:, 3:]
    laplace = torch.distributions.Laplace(mu, log_b.exp())
    # change of variables y = logit(x): p(x) = Laplace(y) * |dy/dx| = Laplace(y) / (x (1 - x))
    expected = -(laplace.log_prob(torch.logit(x)) - torch.log(x * (1 - x))).mean()
    torch.testing.assert_close(compute_logit_laplace_nll(stats, images), expected)


def test_pixel_maps_and_metrics():
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    assert float(map_pixels(x).min()) >= 0.1 and float(map_pixels(x).max()) <= 0.9
    assert float(compute_psnr(x, x + 0.1)) == pytest.approx(20.0, abs=1e-3)
    used, ppl = compute_code_usage(torch.tensor([[0, 0, 1, 1]]), 8)
    assert float(used) == 0.25 and float(ppl) == pytest.approx(2.0)
    grid = image_grid([torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)])
    assert grid.shape == (8, 8, 3) and grid.dtype.name == "uint8"
    assert grid[:4].max() == 0 and grid[4:].min() == 255


@pytest.mark.slow
def test_dvae_trains_on_digits_and_exports_a_tokenizer(ray_local, tmp_path):
    from data_pipeline.config import load_config
    from data_pipeline.digits import DigitsConfig, build_digits
    from trainer.config import TrainConfig
    from trainer.launch import fit
    from trainer.pretrained.image_tokenizers import load_image_tokenizer

    build_digits(DigitsConfig(out=str(tmp_path / "digits"), photos=0), log=lambda *_: None)
    steps = 40
    cfg = load_config(
        TrainConfig,
        REPO / "jobs/configs/dvae_digits.yaml",
        [
            "name=dvae",
            f"checkpoint.storage_path={tmp_path}",
            f"data.path={tmp_path}/digits/train",
            f"steps={steps}",
            "log_every=10",
            "dvae.n_hid=16",
            "dvae.n_init=32",
            "dvae.vocab_size=64",
            f"dvae_train.tau_steps={steps}",
            f"dvae_train.kl_warmup_steps={steps // 2}",
            "data.batch_size=16",
            "optimizer.lr=5e-3",
            "optimizer.warmup_steps=2",
            "failure_max_retries=0",
        ],
    )
    result = fit(cfg)
    assert result.error is None, result.error
    run = tmp_path / "dvae"
    lines = (run / "tensorboard/metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    curve = [m["recon_loss"] for m in logged]
    assert len(curve) == 4 and curve[-1] < 0.6 * curve[0], curve
    last = logged[-1]
    # Metrics average over the log interval: tau follows the optimizer step (the on_step hook).
    taus = [compute_gumbel_tau(s, start=1, end=1 / 16, steps=steps) for s in range(30, 40)]
    assert last["tau"] == pytest.approx(sum(taus) / len(taus))
    assert last["beta"] == 1.0 and 0 < last["codebook_used"] <= 1 and last["psnr"] > 10
    assert sorted(p.name for p in (run / "images").glob("*.png"))  # originals over recons

    # The exported weights are a tokenizer that reconstructs held-out digits (black: ~7 dB).
    tok = load_image_tokenizer(str(run))
    assert (tok.kind, tok.downsample, tok.vocab_size) == ("dvae", 4, 64)
    val = torch.stack([torch.tensor(img) for img in read_images(tmp_path / "digits/val")])
    val = val.permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    psnr = float(compute_psnr(tok.decode(tok.encode(val)), val))
    assert psnr > float(compute_psnr(torch.zeros_like(val), val)) + 5, psnr


def read_images(shards: Path) -> list:
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.shards import iter_tar_samples

    return [
        np.asarray(Image.open(io.BytesIO(m["png"])).convert("RGB"))
        for shard in sorted(shards.glob("*.tar"))
        for _, m in iter_tar_samples(shard.read_bytes())
    ]
