"""Objectives with several parts (a GAN): one DeepSpeed engine and optimizer per part inside the
one loop; checkpoints hold every part's state and a resumed run restores all of them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline import fs
from tests.trainer.test_vqgan import vqgan_train_config
from trainer import checkpoint as ck
from trainer.engine import initialize_parts, trains_only


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from data_pipeline.digits import DigitsConfig, build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=str(out), photos=0), log=lambda *_: None)
    return out / "train"


def test_trains_only_freezes_the_other_parts(one_thread):
    """The generator loss runs the discriminator, yet puts no gradient on it (Lightning's
    toggle_optimizer); requires_grad is restored afterwards."""
    gen, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    engines = {"model": SimpleNamespace(module=gen), "discriminator": SimpleNamespace(module=disc)}
    with trains_only(engines, "model"):
        assert not any(p.requires_grad for p in disc.parameters())
        loss = -disc(gen(torch.randn(3, 4))).mean()
    assert all(p.requires_grad for p in disc.parameters())
    loss.backward()
    assert gen.weight.grad is not None and gen.weight.grad.abs().sum() > 0
    assert disc.weight.grad is None


def test_several_parts_refuse_zero3(tmp_path):
    from trainer.objectives.vqgan import VqganObjective

    cfg = vqgan_train_config(tmp_path, "z3", tmp_path, "engine.zero_stage=3")
    with pytest.raises(ValueError, match=r"2 parts \(model, discriminator\).*zero_stage <= 2"):
        initialize_parts(cfg, VqganObjective(cfg), 1)


def test_driver_refuses_cross_field_errors_before_any_worker_starts(tmp_path):
    """`build_trainer` (the driver) raises before Ray Train is asked for anything: no workers,
    no dataset execution."""
    from trainer.launch import build_trainer

    cfg = vqgan_train_config(tmp_path, "z3d", tmp_path, "engine.zero_stage=3")
    with pytest.raises(ValueError, match=r"2 parts \(model, discriminator\).*zero_stage <= 2"):
        build_trainer(cfg)
    cfg = vqgan_train_config(
        tmp_path, "off", tmp_path, "engine.zero_stage=0", "engine.offload_optimizer=cpu"
    )
    with pytest.raises(ValueError, match=r"offload_optimizer=cpu needs engine.zero_stage >= 1"):
        build_trainer(cfg)


def exported(storage: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    steps = dict(ck.list_complete(fs.resolve(str(storage)).join(name)))
    assert step in steps, sorted(steps)
    return load_file(str(Path(steps[step].path) / "model.safetensors"))


@pytest.mark.slow
def test_gan_worker_killed_resumes_both_optimizers_exactly(ray_local, tmp_path, digits):
    """The GAN is on from step 0, so both parts have Adam state. A worker dies after step 3; the
    restarted group resumes from step 2 and ends bit-identical to an uninterrupted run, which
    needs both parts' weights AND both optimizers' moments restored, and the dead-code usage
    counts (a restart at step 3). (The two runs are separate
    `fit`s of a cached dataset: this also checks that `data.cache` keeps the order.)"""
    from trainer.launch import fit

    common = (
        "steps=6",
        "log_every=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep=0",
        "vqgan_train.disc_start=0",
        # Dead codes restart at step 3, from the usage counted since step 0: the resumed run
        # (from step 2) must restore the counts of steps 1-2 to restart the same codes.
        "vqgan_train.dead_code_every=3",
    )
    clean = fit(vqgan_train_config(tmp_path / "clean", "gan", digits, *common))
    assert clean.error is None, clean.error
    marker = tmp_path / "killed"
    faulty = fit(
        vqgan_train_config(
            tmp_path / "faulty",
            "gan",
            digits,
            *common,
            "failure_max_retries=1",
            "faults.kill_at_steps=[3]",
            f"faults.marker_dir={marker}",
        )
    )
    assert faulty.error is None, faulty.error
    assert marker.exists(), "the fault was not injected"
    assert faulty.metrics["step"] == 6 and faulty.metrics["d_loss"] > 0

    # Every checkpoint holds both parts' DeepSpeed state, each rank's optimizer shard included.
    step2 = Path(dict(ck.list_complete(fs.resolve(str(tmp_path / "faulty")).join("gan")))[2].path)
    for ds in ("ds", "ds_discriminator"):
        shards = sorted(p.name for p in (step2 / ds / ck.DS_TAG).glob("*optim_states.pt"))
        assert len(shards) == 2, (ds, shards)

    a, b = exported(tmp_path / "clean", "gan", 6), exported(tmp_path / "faulty", "gan", 6)
    assert a.keys() == b.keys() and any(k.startswith("loss.discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for rank in (0, 1):  # and each rank's code counts, taken over 2 steps
        usage = load_file(str(step2 / f"code_usage_rank{rank:05d}.safetensors"))
        assert usage["counts"].sum() > 0 and int(usage["restarted_at"]) == 0
