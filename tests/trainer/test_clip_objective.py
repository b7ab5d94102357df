"""objective=clip through the one engine: open_clip's contrastive loss on the digits shards, and
weights that open_clip itself loads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.config import load_config
from data_pipeline.digits import DigitsConfig, build_digits
from trainer.config import TrainConfig
from trainer.launch import fit

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_clip_trains_on_digits_and_loads_in_open_clip(ray_local, tmp_path):
    import open_clip
    import torch

    from trainer.objectives.clip import open_clip_arch

    build_digits(DigitsConfig(out=str(tmp_path / "digits"), photos=0), log=lambda *_: None)
    cfg = load_config(
        TrainConfig,
        REPO / "jobs/configs/clip_digits.yaml",
        [
            "name=clip",
            f"checkpoint.storage_path={tmp_path}",
            f"data.path={tmp_path}/digits/train",
            "steps=24",
            "log_every=6",
            "checkpoint.every_steps=6",
            "data.batch_size=32",
            "optimizer.lr=2e-3",
            "optimizer.warmup_steps=2",
            "failure_max_retries=0",
            f"clip.model_config={REPO}/jobs/configs/clip_digits_tiny.json",
        ],
    )
    result = fit(cfg)
    assert result.error is None
    curve = [m["loss"] for _, m in sorted(result.best_checkpoints, key=lambda t: t[1]["step"])]
    assert len(curve) == 4 and curve[-1] < curve[0] - 0.2, curve  # contrastive loss falls

    # The exported weights are an open_clip checkpoint: open_clip loads them strictly.
    weights = Path(result.checkpoint.path) / "model.safetensors"
    open_clip_arch(cfg.clip.model, cfg.clip.model_config)
    model, _, preprocess = open_clip.create_model_and_transforms(
        cfg.clip.model, pretrained=str(weights)
    )
    assert float(model.logit_scale.exp()) != pytest.approx(1 / 0.07, rel=1e-3)  # it was trained
    with torch.no_grad():
        text = open_clip.get_tokenizer(cfg.clip.model)(["the number 3"])
        assert torch.isfinite(model.encode_text(text)).all()
