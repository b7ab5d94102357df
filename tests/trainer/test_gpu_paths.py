"""GPU code paths, checked on the CPU (#25): no GPU exists here, so each test patches the
`torch.cuda` functions the code consults, or hands it a non-CPU device (torch's `lazy`), and
asserts what a GPU run would get.

  * the device follows Ray's reservation (`scaling.use_gpu`), not the host nor the driver's shell;
  * `sync_scalar_params` broadcasts on the worker's device (NCCL takes CUDA tensors only);
  * fp16 loss-scale overflows are not bad steps; `precision: auto` ignores emulated bf16;
  * MFU's peak for a GPU is the GPU's (a datasheet table), GPU memory is reported, metrics
    accumulate on the device without a host sync per micro-step;
  * ZeRO settings for GPU workers; the data path's CPUs, prefetch and pinned memory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from data_pipeline.config import load_config
from trainer import engine as eng
from trainer.config import ScalingSection, TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def tiny(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / "dalle_tiny.yaml", ["name=gpu", *overrides])


# ---- 1. the device follows the reservation ------------------------------------------------------


def test_worker_device_env_follows_the_reservation_not_the_inherited_accelerator(monkeypatch):
    """A GPU worker never keeps the DS_ACCELERATOR=cpu it inherits (the Makefile exports it); a
    CPU worker gets cpu and no visible GPU, on a host whose CUDA is available."""
    from deepspeed.accelerator import real_accelerator

    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert eng.worker_device_env(True) == {"DS_ACCELERATOR": "cuda"}
    assert eng.apply_worker_device(True) == torch.device("cuda", 3)
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # Ray sets the GPU worker's own
    # DeepSpeed had picked the CPU accelerator in this process: dropped, re-read from the env
    assert real_accelerator.ds_accelerator is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert eng.apply_worker_device(False) == torch.device("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert eng.dist_backend(False) == "gloo" and eng.dist_backend(True) == "nccl"


def test_launch_and_submit_never_forward_the_shells_accelerator(monkeypatch):
    """The driver's DS_ACCELERATOR=cpu reaches no worker: not through the job's runtime env
    (`worker_env`, `t2i submit`'s FORWARD_ENV); each training worker's runtime env carries its
    own, from scaling.use_gpu; `init_ray` on a GPU host sets none."""
    from jobs import common
    from jobs.submit import FORWARD_ENV
    from trainer import launch

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/tmp/ext")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)  # set by ray_local
    assert launch.worker_env() == {"TORCH_EXTENSIONS_DIR": "/tmp/ext"}
    assert "DS_ACCELERATOR" not in FORWARD_ENV
    worker_runtime_env = launch.worker_runtime_env
    gpu = tiny("scaling.use_gpu=true")
    assert worker_runtime_env(gpu) == {"env_vars": {"DS_ACCELERATOR": "cuda"}}
    assert worker_runtime_env(tiny()) == {
        "env_vars": {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    }

    import ray

    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(common, "_has_cuda", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: kw)
    common.init_ray(common.RayConfig(num_cpus=1, dashboard=False))
    assert "DS_ACCELERATOR" not in os.environ


def test_cpu_worker_on_a_gpu_host_builds_a_cpu_engine_with_gloo(world_of_one, monkeypatch):
    """use_gpu=false where torch.cuda.is_available() says True: the engine is a CPU engine,
    DeepSpeed adopts the group as gloo, and precision `auto` never asks the GPU."""
    import deepspeed

    from trainer.objectives.dalle import DalleObjective

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    backends = []
    init = deepspeed.init_distributed

    def spy(dist_backend=None, **kw):
        backends.append(dist_backend)
        return init(dist_backend="gloo", **kw)  # the group exists: DeepSpeed adopts it

    def no_gpu_here(*_a, **_k):
        raise AssertionError("a CPU worker asked the GPU whether it has bf16")

    monkeypatch.setattr(deepspeed, "init_distributed", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_gpu_here)
    cfg = tiny("scaling.num_workers=1", "engine.zero_stage=1", "data.batch_size=2")
    assert not cfg.scaling.use_gpu and cfg.engine.precision == "auto"
    engines = eng.initialize_parts(cfg, DalleObjective(cfg), 1)
    assert backends == ["gloo"]
    assert eng.engine_device(engines) == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in engines["model"].module.parameters())


# ---- 2. scalar parameters travel on the worker's device -----------------------------------------


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))  # CLIP's 0-dim parameter
        self.proj = torch.nn.Linear(2, 2)


def fake_broadcast(device: torch.device, seen: list):
    """A broadcast that refuses a tensor off `device` (as NCCL refuses a CPU tensor) and
    delivers rank 0's value 7.0."""

    def broadcast(t, src=0, **_):
        seen.append(t.device)
        assert t.device.type == device.type, f"broadcast of a {t.device} tensor, run on {device}"
        t.fill_(7.0)

    return broadcast


def test_sync_scalar_params_broadcasts_on_the_workers_device(lazy, monkeypatch):
    """Before DeepSpeed moves the model, the 0-dim parameter's broadcast runs on the engine's
    device, through `wrap` (a GPU worker's device stands in as `lazy`), and its value lands."""
    import deepspeed

    seen: list = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "broadcast", fake_broadcast(lazy, seen))
    monkeypatch.setattr(
        eng, "worker_device", lambda use_gpu: lazy if use_gpu else None, raising=False
    )
    engine = SimpleNamespace(dp_world_size=2, zero_optimization=lambda: True)
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (engine, None, None, None))
    model = Scalar()
    assert eng.wrap(tiny("scaling.use_gpu=true"), model, {}) is engine
    assert seen == [lazy] and model.logit_scale.item() == 7.0

    seen.clear()
    model = Scalar()
    eng.sync_scalar_params(model, lazy)
    assert seen == [lazy] and model.logit_scale.item() == 7.0
    assert model.logit_scale.device.type == "cpu" and model.logit_scale.ds_optim_param


# ---- 3. fp16 overflow skips and emulated bf16 ----------------------------------------------------


def fake_engine(*, applied: bool, fp16: bool):
    return SimpleNamespace(
        was_step_applied=lambda: applied,
        fp16_enabled=lambda: fp16,
        dynamic_loss_scale=lambda: fp16,
    )


def test_fp16_loss_scale_overflow_skips_are_not_bad_steps():
    """Ten overflow skips in a row at an fp16 start: no NonFiniteError (DeepSpeed stops the run
    itself at its minimum scale); five skipped bf16 steps still stop it; an applied step resets."""
    from trainer.callbacks import NonFiniteGuard

    guard = NonFiniteGuard(max_bad=5, device=torch.device("cpu"))
    fp16 = {"model": fake_engine(applied=False, fp16=True)}
    for _ in range(10):
        assert not guard.step_applied(fp16, ["model"])
    assert guard.in_a_row == 0 and guard.skip_reason == "fp16 loss-scale overflow"
    bf16 = {"model": fake_engine(applied=False, fp16=False)}
    for _ in range(4):
        assert not guard.step_applied(bf16, ["model"])
    assert guard.skip_reason == "non-finite gradients"
    with pytest.raises(eng.NonFiniteError, match="5 consecutive"):
        guard.step_applied(bf16, ["model"])
    guard.in_a_row = 0
    mixed = {
        "model": fake_engine(applied=True, fp16=True),
        "d": fake_engine(applied=False, fp16=False),
    }
    assert not guard.step_applied(mixed, ["model", "d"]) and guard.in_a_row == 1
    assert guard.step_applied({"model": fake_engine(applied=True, fp16=True)}, ["model"])


def test_precision_auto_does_not_count_emulated_bf16(monkeypatch):
    """A pre-Ampere GPU: torch says bf16 is supported (emulated) unless asked for native only.
    `auto` picks fp16 there, bf16 on a GPU with native bf16."""
    native = {"value": False}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native["value"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert eng.resolve_precision("auto") == "fp16"  # this process's GPU
    assert eng.resolve_precision("auto", gpu=True) == "fp16"
    native["value"] = True
    assert eng.resolve_precision("auto", gpu=True) == "bf16"
    cfg = tiny("scaling.use_gpu=true", "engine.zero_stage=2")
    assert eng.build_deepspeed_config(cfg, 1)["bf16"] == {"enabled": True}
    native["value"] = False
    assert eng.build_deepspeed_config(cfg, 1)["fp16"]["enabled"]


# ---- 5. metrics: the GPU's peak, GPU memory, no host sync per micro-step -------------------------


def test_gpu_peak_is_the_datasheet_figure_never_a_cpu_probe(monkeypatch):
    """MFU's denominator for a GPU run: the named GPU's dense peak in the run's precision (fp32
    matmuls run as TF32 unless torch keeps full fp32); an unknown GPU is probed on the GPU."""
    from trainer import metrics

    def never(*_a, **_k):
        raise AssertionError("probed")

    assert metrics.gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert metrics.gpu_peak_flops("NVIDIA H100 PCIe", "fp16") == 756.5e12
    assert metrics.gpu_peak_flops("NVIDIA H200", "tf32") == 494.7e12
    assert metrics.gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert metrics.gpu_peak_flops("NVIDIA L4", "bf16") == 121e12
    assert metrics.gpu_peak_flops("NVIDIA L40S", "bf16") == 0.0  # not an L4
    assert metrics.gpu_peak_flops("NVIDIA A10G", "fp16") == 125e12
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(metrics, "measure_peak_flops", never)
    assert metrics.peak_flops(cuda, "bf16") == 312e12
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert metrics.peak_flops(cuda, "fp32") == 156e12  # TF32
        torch.set_float32_matmul_precision("highest")
        assert metrics.peak_flops(cuda, "fp32") == 19.5e12
    finally:
        torch.set_float32_matmul_precision(prec)
    probed = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 9090")
    monkeypatch.setattr(
        metrics, "measure_peak_flops", lambda dtype, **kw: probed.append(kw["device"]) or 1.0
    )
    assert metrics.peak_flops(cuda, "bf16") == 1.0 and probed == [cuda]


class CountingSync:
    """Counts reads of a tensor's value into Python (`float(t)`, `t.item()`, `t.tolist()`):
    each is a host sync on a GPU."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("__float__", "item", "tolist"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counted(original))

    def counted(self, original):
        def read(t, *a, **k):
            self.n += 1
            return original(t, *a, **k)

        return read


def test_metrics_accumulate_on_the_device_and_report_gpu_memory(tmp_path, monkeypatch):
    """Micro-steps add their loss and metrics on the device, reading nothing; the log step reads
    them once; a GPU rank's row carries the allocator's memory beside RSS."""
    from trainer import metrics

    cfg = tiny(f"checkpoint.storage_path={tmp_path}", "log_every=1")
    objective = SimpleNamespace(tokens_in_batch=lambda b: 4, flops_per_token=lambda: 10.0)
    engine = SimpleNamespace(
        optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]), get_global_grad_norm=lambda: None
    )
    monkeypatch.setattr(metrics, "engine_state_bytes", lambda e: 0)
    monkeypatch.setattr(metrics, "all_ranks_sum", lambda v: v)
    cpu = metrics.MetricsLogger(cfg, 1, 1, objective, 1e12)
    with pytest.MonkeyPatch.context() as mp:
        sync = CountingSync(mp)
        cpu.accumulate(torch.tensor(1.0), {"acc": torch.tensor(0.5)}, {})
        assert sync.n == 0
    row = cpu.step({"model": engine}, SimpleNamespace(step=2, epoch=0, skipped_steps=0))
    assert row["loss"] == 1.0 and row["acc"] == 0.5 and "gpu_mem_peak_gib" not in row

    logger = metrics.MetricsLogger(cfg, 1, 1, objective, 1e12, device=torch.device("cuda", 0))
    for name, gib in (("memory_allocated", 1), ("memory_reserved", 2), ("max_memory_allocated", 3)):
        monkeypatch.setattr(torch.cuda, name, lambda d=None, gib=gib: gib * 2**30)
    sync = CountingSync(monkeypatch)
    for i in range(4):
        logger.accumulate(torch.tensor(float(i)), {"acc": torch.tensor(1.0), "tau": 0.5}, {})
    assert sync.n == 0
    row = logger.step({"model": engine}, SimpleNamespace(step=1, epoch=0, skipped_steps=0))
    assert sync.n == 1  # one read of every sum together
    assert row["loss"] == 1.5 and row["acc"] == 1.0 and row["tau"] == 0.5
    assert (row["gpu_mem_allocated_gib"], row["gpu_mem_reserved_gib"]) == (1.0, 2.0)
    assert row["gpu_mem_peak_gib"] == 3.0 and row["peak_rss_gib"] > 0


# ---- 6. ZeRO settings for GPU workers ----------------------------------------------------------


def test_zero_settings_for_gpu_workers_and_unchanged_for_cpu_workers():
    """GPU workers: overlapped reduction, buckets from the model's width (h^2 reduce buckets,
    a 12 h^2 layer prefetched, at least 3 layers live), pinned offload. CPU workers: today's."""
    base = [
        "engine.zero_stage=3",
        "engine.offload_optimizer=cpu",
        "engine.precision=fp32",
        "dalle.dim=2048",
        "dalle.heads=16",
        "dalle.head_dim=128",
    ]
    cpu = eng.build_deepspeed_config(tiny(*base), 2)["zero_optimization"]
    assert cpu == {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "sub_group_size": 50_000_000,
        "stage3_gather_16bit_weights_on_model_save": True,
        "stage3_max_live_parameters": 50_000_000,
        "stage3_max_reuse_distance": 50_000_000,
        "stage3_prefetch_bucket_size": 5_000_000,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    }
    gpu = eng.build_deepspeed_config(tiny(*base, "scaling.use_gpu=true"), 2)["zero_optimization"]
    h2 = 2048 * 2048
    assert gpu["overlap_comm"] and gpu["offload_optimizer"]["pin_memory"]
    assert gpu["reduce_bucket_size"] == h2
    assert gpu["stage3_prefetch_bucket_size"] == 12 * h2  # one layer: > the 5e6 of CPU workers
    assert gpu["stage3_max_live_parameters"] == gpu["stage3_max_reuse_distance"] == 10**9
    assert gpu["stage3_param_persistence_threshold"] == 20480
    big = tiny(*base, "scaling.use_gpu=true", "dalle.dim=8192", "dalle.heads=64")
    live = eng.build_deepspeed_config(big, 2)["zero_optimization"]["stage3_max_live_parameters"]
    assert live == 3 * 12 * 8192**2
    two = eng.build_deepspeed_config(tiny("engine.zero_stage=2", "scaling.use_gpu=true"), 2)
    assert two["zero_optimization"]["overlap_comm"]
    assert two["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # dalle_tiny: dim 64
    assert (
        eng.model_width(tiny("objective=ldm", "unet.block_out_channels=[320, 640, 1280]")) == 1280
    )


# ---- 7. the data path ------------------------------------------------------------------------


def test_data_cpus_default_scales_with_the_workers_and_the_objective():
    """Unset scaling.data_cpus: 2 CPU workers keep 1 data CPU, 16 GPU workers of an image
    objective get 32, of a token objective 8; clip's data path minimum still holds; a set value
    wins."""
    from trainer import launch
    from trainer.launch import capacity_need, data_cpus

    plain = object()
    assert data_cpus(tiny(), plain) == 1.0
    gpus = ["scaling.use_gpu=true", "scaling.num_workers=16"]
    assert data_cpus(tiny(*gpus), plain) == 8.0
    assert data_cpus(tiny(*gpus, "objective=dvae"), plain) == 32.0
    assert data_cpus(tiny(*gpus, "objective=ldm"), plain) == 8.0
    assert data_cpus(tiny("objective=clip"), SimpleNamespace(data_cpus_min=2.0)) == 2.0
    assert data_cpus(tiny(*gpus, "scaling.data_cpus=3"), plain) == 3.0
    assert data_cpus(tiny(*gpus, "scaling.data_cpus=0"), plain) == 0.0
    assert ScalingSection().data_cpus is None
    s = ScalingSection(num_workers=128, use_gpu=True)
    assert launch.default_data_cpus(s, "vqgan") == 256.0
    assert capacity_need(s) == {"CPU": 128 + 64.0, "GPU": 128.0}


def test_gpu_batches_are_prefetched_into_pinned_memory():
    """iter_torch_batches gets prefetch_batches >= 2, and pin_memory on GPU workers only."""
    from trainer import checkpoint as ck
    from trainer.loop import iter_epoch

    calls = []

    class Shard:
        def iter_torch_batches(self, **kw):
            calls.append(kw)
            return iter(range(3))

    for use_gpu in (False, True):
        cfg = tiny(f"scaling.use_gpu={str(use_gpu).lower()}")
        assert list(iter_epoch(Shard(), cfg, ck.TrainState(batches_in_epoch=1))) == [1, 2]
    assert [c["prefetch_batches"] >= 2 for c in calls] == [True, True]
    assert [c["pin_memory"] for c in calls] == [False, True]
    assert dataclasses.asdict(tiny())["scaling"]["data_cpus"] is None
