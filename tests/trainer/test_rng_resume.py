"""Exact resume covers the device's random generator (#25).

On a GPU rank, dropout, Gumbel noise and `randn_like` draw from the CUDA generator, not the CPU
one. No GPU exists here, so a real `torch.Generator` stands in for the CUDA generator: the
`torch.cuda` functions the checkpoint code calls are patched to read and write it. A run draws
from both generators, checkpoints through the real `save`, draws on; a fresh process (both
generators reseeded, as the loop reseeds at start) resumes through the real `resume` and must
draw exactly what the uninterrupted run drew. Before the fix only the CPU state was saved, and
the resumed run's device draws replayed the start of the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from data_pipeline import fs
from data_pipeline.config import load_config
from tests.conftest import free_port
from trainer import checkpoint as ck
from trainer.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.fixture
def gloo_world():
    """A real gloo process group of one rank in this process (what Ray Train sets up)."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this test process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


class FakeCuda:
    """One visible 'GPU' whose generator is a real torch.Generator, behind the torch.cuda API
    the checkpoint code uses (an initialised CUDA context, get/set of every device's state)."""

    def __init__(self, monkeypatch, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        for name, fn in {
            "is_available": lambda: True,
            "is_initialized": lambda: True,
            "device_count": lambda: 1,
            "get_rng_state_all": lambda: [self.gen.get_state()],
            "set_rng_state_all": lambda states: self.gen.set_state(states[0]),
            "manual_seed_all": lambda s: self.gen.manual_seed(s),
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def dropout_mask(self) -> torch.Tensor:
        """What dropout on the GPU draws (here from the stand-in generator)."""
        return torch.rand(16, generator=self.gen) > 0.5


def fake_engine(module: torch.nn.Module):
    """The parts of a DeepSpeed engine that save and resume use."""

    def save_checkpoint(path, tag, save_latest):
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        torch.save(module.state_dict(), os.path.join(path, tag, "model_states.pt"))

    def load_checkpoint(path, tag, **_):
        module.load_state_dict(torch.load(os.path.join(path, tag, "model_states.pt")))

    return SimpleNamespace(
        device=torch.device("cpu"),
        module=module,
        save_checkpoint=save_checkpoint,
        load_checkpoint=load_checkpoint,
    )


def draws(cuda: FakeCuda, n: int) -> list[torch.Tensor]:
    """n steps' random draws: a device dropout mask and a CPU caption-noise draw each."""
    return [t for _ in range(n) for t in (cuda.dropout_mask(), torch.randn(3))]


def test_resume_restores_the_device_generator(gloo_world, monkeypatch, tmp_path):
    cfg = load_config(TrainConfig, CONFIGS / "dalle_tiny.yaml", ["name=rng"])
    run = fs.resolve(str(tmp_path)).join("rng")
    engines = {"model": fake_engine(torch.nn.Linear(2, 2))}
    cuda = FakeCuda(monkeypatch, seed=11)
    torch.manual_seed(5)
    draws(cuda, 3)  # steps 1..3
    state = ck.TrainState(step=3, epoch=0, batches_in_epoch=3)
    ck.save(engines, cfg, run, state, 0, 1, objective=None, export=False)
    cpu_state = torch.get_rng_state()
    uninterrupted = draws(cuda, 4)  # steps 4..7

    cuda.gen.manual_seed(11)  # a new process: the loop seeds every generator again
    torch.manual_seed(5)
    assert ck.resume(engines, run, 0) == state
    resumed = draws(cuda, 4)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))
    assert set(ck.rng_state()) == {"torch_cpu", "torch_cuda_0"}

    # a checkpoint from a CPU-only run (no device state): a fresh device stream, not step 0's
    cuda.gen.manual_seed(11)
    first = cuda.dropout_mask()
    cuda.gen.manual_seed(11)
    ck.restore_rng({"torch_cpu": cpu_state}, step=3)
    assert not torch.equal(cuda.dropout_mask(), first)
