"""The engine for real: Ray Train workers x DeepSpeed ZeRO on the shared local Ray instance.

Tiny model, synthetic tokens, 2 workers. Each `fit` takes ~10-30 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline import fs
from data_pipeline.config import load_config
from trainer import checkpoint as ck
from trainer.config import TrainConfig
from trainer.launch import fit

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "dalle_tiny.yaml"
pytestmark = pytest.mark.slow


def train(storage: str, name: str, *overrides: str):
    cfg = load_config(
        TrainConfig,
        TINY,
        [f"name={name}", f"checkpoint.storage_path={storage}", "failure_max_retries=0", *overrides],
    )
    result = fit(cfg)
    assert result.error is None, result.error
    return cfg, result


def final_weights(storage: str, name: str, step: int) -> dict[str, torch.Tensor]:
    run = fs.resolve(storage).join(name)
    steps = {s: loc for s, loc in ck.list_complete(run)}
    assert step in steps, f"no complete checkpoint at step {step}: {sorted(steps)}"
    local = Path(ck.staging_dir("test"))
    ck.download(steps[step], str(local))
    return load_file(str(local / "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_trains_and_loss_falls(ray_local, tmp_path, stage):
    # Stage 1 also gets two NaN losses injected: each step is skipped on both ranks and counted.
    nan = ["faults.nan_loss_at_steps=[3, 5]"] if stage == 1 else []
    _, result = train(
        str(tmp_path),
        f"zero{stage}",
        f"engine.zero_stage={stage}",
        "steps=16",
        "log_every=4",
        "checkpoint.every_steps=0",
        *nan,
    )
    m = result.metrics
    assert m["step"] == 16 and m["skipped_steps"] == (2 if nan else 0)
    # Chance level is ln(64) = 4.16 for both modalities; the synthetic data is learnable.
    assert m["loss"] < 3.5, m
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and m["grad_norm"] > 0
    assert (tmp_path / f"zero{stage}" / "tensorboard").is_dir()
    assert result.checkpoint is not None and result.checkpoint.path.endswith("step_00000016")
    weights = final_weights(str(tmp_path), f"zero{stage}", 16)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_worker_killed_resumes_exactly_on_s3(ray_local, tmp_path, s3_bucket):
    """A worker dies after step 6 (first attempt only); Ray restarts the group, which resumes
    from the step-4 checkpoint on S3 and ends with the same weights as an uninterrupted run.
    Caption noise is on: its random draws must resume exactly too."""
    common = (
        "steps=10",
        "log_every=2",
        "checkpoint.every_steps=4",
        "checkpoint.keep=0",
        "dalle.text_insert_p=0.5",
        "dalle.text_replace_p=0.2",
    )
    _, clean = train(str(tmp_path / "clean"), "run", *common)

    storage = f"s3://{s3_bucket}/ckpts"
    marker = tmp_path / "killed"
    # Plant an incomplete checkpoint that is newer than any real one: it must be ignored.
    run = fs.resolve(storage).join("run")
    fs.write_bytes_atomic(run.join("checkpoints", "step_00000009", "train_state.json"), b"{}")
    _, faulty = train(
        storage,
        "run",
        *common,
        "failure_max_retries=2",
        "faults.kill_at_step=6",
        f"faults.kill_marker={marker}",
    )
    assert marker.exists(), "the fault was not injected"
    assert faulty.metrics["step"] == 10
    assert faulty.metrics["loss"] == pytest.approx(clean.metrics["loss"], rel=1e-6)
    a = final_weights(str(tmp_path / "clean"), "run", 10)
    b = final_weights(storage, "run", 10)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [s for s, _ in ck.list_complete(run)]
    assert steps == [10, 8, 4]  # complete ones only; 9 was never complete


def test_consecutive_nan_steps_stop_the_job(ray_local, tmp_path):
    cfg = load_config(
        TrainConfig,
        TINY,
        [
            "name=nanstop",
            f"checkpoint.storage_path={tmp_path}",
            "failure_max_retries=0",
            "steps=6",
            "engine.max_bad_steps=2",
            "faults.nan_loss_at_steps=[2, 2]",  # step 2 gets a NaN loss twice in a row
        ],
    )
    with pytest.raises(Exception, match="consecutive non-finite steps"):
        result = fit(cfg)
        if result.error:
            raise result.error


def test_zero3_trains_and_fp32_consolidation_reproduces_eval_loss(ray_local, tmp_path):
    """ZeRO-3 (fp32, built under zero.Init) trains; its checkpoint ->
    get_fp32_state_dict_from_zero_checkpoint -> a plain model whose loss on a fixed batch equals
    the loss of the exported weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from data_pipeline.token_dataset import SyntheticTokens
    from trainer.models.dalle import DalleTransformer, compute_dalle_loss

    cfg, result = train(
        str(tmp_path),
        "z3",
        "engine.zero_stage=3",
        "steps=12",
        "checkpoint.every_steps=0",
        "engine.precision=fp32",
    )
    assert result.metrics["loss"] < 3.7 and result.metrics["skipped_steps"] == 0
    run = fs.resolve(str(tmp_path)).join("z3")
    (step, loc), *_ = ck.list_complete(run)
    local = tmp_path / "dl"
    ck.download(loc, str(local))
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(local / "ds"), tag=ck.DS_TAG)
    exported = load_file(str(local / "model.safetensors"))
    assert fp32.keys() == exported.keys()

    m = cfg.dalle
    batch = SyntheticTokens(
        text_len=m.text_len,
        text_vocab=m.text_vocab,
        image_grid=m.image_grid,
        image_vocab=m.image_vocab,
        seed=cfg.seed,  # the training data's patterns, rows it did not train on
    )({"id": list(range(10_000, 10_016))})
    text, image = (torch.as_tensor(batch[k]) for k in ("text_tokens", "image_codes"))

    def eval_loss(state):
        model = DalleTransformer(m).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            tl, il = model(text, image)
            return compute_dalle_loss(
                tl,
                il,
                model.internal_text(text),
                image,
                text_weight=m.text_loss_weight,
                image_weight=m.image_loss_weight,
            )[0].item()

    a, b = eval_loss(fp32), eval_loss(exported)
    assert a == pytest.approx(b, rel=1e-5)
    assert a < 4.0  # trained: below chance (ln 64 = 4.16)
    info = json.loads((local / "train_state.json").read_text())
    assert info["step"] == step == 12
