"""Collectives are device-honest, and resume is decided once.

NCCL refuses any tensor that is not on the GPU ("Tensors must be CUDA and dense"); on a CPU-only
machine every tensor is on the CPU, so a run cannot show that bug by itself. `CollectiveGuard`
wraps the tensor collectives of `torch.distributed` (the namespace our code and DeepSpeed's comm
layer call) and fails on any tensor that is not on the device the run declares:

  * with a real DeepSpeed run (world of one, a real gloo process group, the real loop), the
    declared device is the engine's (`engine.device`): every objective, single- and multi-part,
    a few steps, a checkpoint and a resume;
  * with the loop's collective functions driven by engines on torch's `lazy` device (a second,
    non-CPU device that computes on this CPU), the declared device is `lazy`: a tensor built on
    the CPU instead of the engine's device fails there exactly as NCCL fails on a GPU. The guard
    runs those collectives on a CPU copy for gloo and writes the result back.

torch's object collectives (`broadcast_object_list`, `all_gather_object`) pick their device from
the group's backend themselves and are not checked.

The last section runs every objective's loss (fp32, bf16, fp16), the AR and LDM samplers' steps
and the EMA update with model and batch on a non-CPU device (`lazy`, or `meta` where nothing
data-dependent runs): a CPU tensor mixed into a loss fails there as it fails on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist

from benchmarks.gpu_smoke import tiny_overrides
from data_pipeline import fs
from data_pipeline.columns import PIXELS
from data_pipeline.config import load_config
from tests.conftest import free_port
from trainer import checkpoint as ck
from trainer import distributed as tdist
from trainer import loop
from trainer.callbacks import NonFiniteGuard
from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "jobs" / "configs"
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "all_to_all_single",
    "scatter",
    "gather",
    "send",
    "recv",
    "isend",
    "irecv",
)


class DeviceError(AssertionError):
    pass


class CollectiveGuard:
    """Within `with guard:`, every tensor handed to a `torch.distributed` collective must be
    dense and on `device`; else `DeviceError` (raised at the call and recorded in `errors`)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.monkeypatch = pytest.MonkeyPatch()
        self.calls: list[tuple[str, str, str]] = []  # (collective, dtype, caller file)
        self.errors: list[str] = []

    def on_device(self, t: torch.Tensor) -> bool:
        d = self.device
        return t.device.type == d.type and (d.index is None or t.device.index == d.index)

    def __enter__(self):
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self.monkeypatch.setattr(dist, name, self.wrap(name, getattr(dist, name)))
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()

    def wrap(self, name, original):
        def guarded(*args, **kwargs):
            tensors = [
                t
                for v in (*args, *kwargs.values())
                for t in (v if isinstance(v, (list, tuple)) else [v])
                if isinstance(t, torch.Tensor)
            ]
            caller = sys._getframe(1).f_code.co_filename
            for t in tensors:
                if not self.on_device(t) or t.layout != torch.strided:
                    msg = (
                        f"{name} got a {t.layout} {t.dtype} tensor on {t.device} from {caller}; "
                        f"the run's device is {self.device} (NCCL: Tensors must be CUDA and dense)"
                    )
                    self.errors.append(msg)
                    raise DeviceError(msg)
                self.calls.append((name, str(t.dtype), caller))
            if self.device.type in ("cpu", "cuda"):
                return original(*args, **kwargs)
            # A device gloo cannot use (lazy): the collective on CPU copies, written back.
            host_args = [_to_cpu(a) for a in args]
            host_kwargs = {k: _to_cpu(v) for k, v in kwargs.items()}
            out = original(*host_args, **host_kwargs)
            for dev, host in zip(
                (*args, *kwargs.values()), (*host_args, *host_kwargs.values()), strict=True
            ):
                for d, h in zip(_as_list(dev), _as_list(host), strict=True):
                    if isinstance(d, torch.Tensor):
                        d.copy_(h.to(d.device))
            return out

        return guarded


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _to_cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, (list, tuple)):
        return type(v)(_to_cpu(x) for x in v)
    return v


# ---- the guard itself -------------------------------------------------------------------------


def test_guard_fails_on_a_host_tensor_when_the_run_is_on_another_device(
    world_of_one, lazy, monkeypatch
):
    """What main did before (a flag built with `torch.tensor([...])`, on the CPU) is refused; the
    same flag on the run's device goes through and is reduced."""
    with CollectiveGuard(lazy) as guard:
        with pytest.raises(DeviceError, match="on cpu .* the run's device is lazy"):
            dist.all_reduce(torch.tensor([1.0]), op=dist.ReduceOp.MIN)
        flag = torch.ones(1, device=lazy)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        assert flag.item() == 1.0 and flag.device.type == "lazy"
    assert len(guard.errors) == 1


# ---- the loop's collective functions on a non-CPU device ------------------------------------


def fake_engine(device: torch.device, module: torch.nn.Module):
    """What the loop's save/resume use of a DeepSpeed engine: device, module, save and load."""

    def save_checkpoint(path, tag, save_latest):
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        state = {k: v.cpu() for k, v in module.state_dict().items()}
        torch.save(state, os.path.join(path, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"))

    def load_checkpoint(path, tag, **_):
        state = torch.load(os.path.join(path, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"))
        module.load_state_dict({k: v.to(device) for k, v in state.items()})

    return SimpleNamespace(
        device=device,
        module=module,
        save_checkpoint=save_checkpoint,
        load_checkpoint=load_checkpoint,
    )


def test_loop_collectives_use_the_engine_device(world_of_one, lazy, monkeypatch, tmp_path):
    """The non-finite guard, save's finiteness flag, resume's agreement, all_ranks_sum: with the
    engine on a non-CPU device, every tensor they hand to a collective is on that device."""
    from trainer.metrics import all_ranks_sum

    cfg = load_config(TrainConfig, CONFIGS / "dalle_tiny.yaml", ["name=lazy"])
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2).to(lazy)
    engines = {"model": fake_engine(lazy, module)}
    run = fs.resolve(str(tmp_path)).join("lazy")
    with CollectiveGuard(lazy) as guard:
        losses = torch.stack(
            [module(torch.ones(3, device=lazy)).sum(), torch.ones((), device=lazy)]
        )
        nonfinite = NonFiniteGuard(max_bad=5, device=loop.engine_device(engines))
        assert nonfinite.losses_ok({"model": losses})
        assert not nonfinite.losses_ok({"model": losses * float("nan")})
        monkeypatch.setattr(tdist, "collective_device", lambda: lazy)
        assert all_ranks_sum(2.5) == 2.5
        state = ck.TrainState(step=3, epoch=1, batches_in_epoch=2)
        ck.save(engines, cfg, run, state, 0, 1, objective=None, export=False)
        saved = {k: v.cpu().clone() for k, v in module.state_dict().items()}
        with torch.no_grad():
            module.weight.zero_()
        assert ck.resume(engines, run, 0) == state
    assert torch.equal(module.weight.cpu(), saved["weight"])
    assert guard.errors == [] and len(guard.calls) >= 4


def test_vqgan_dead_code_restart_reduces_on_the_model_device(world_of_one, lazy, monkeypatch):
    """The restart's two collectives (usage counts, new rows) run on the model's device."""
    from trainer.objectives.vqgan import VqganObjective

    cfg = load_config(
        TrainConfig,
        CONFIGS / "vqgan_digits.yaml",
        [
            "vqgan.image_size=16",
            "vqgan.ch_mult=[1, 2]",
            "vqgan.n_embed=16",
            "vqgan.z_channels=8",
            "vqgan.embed_dim=4",
            "vqgan_train.dead_code_every=1",
        ],
    )
    objective = VqganObjective(cfg)
    torch.manual_seed(0)
    model = objective.build_parts()["model"].to(lazy)
    monkeypatch.setattr("trainer.objectives.vqgan.set_full_param", _copy_param)
    batch = {PIXELS: torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, device=lazy)}
    objective.usage.counts[:4] = 5  # codes 0..3 used, the rest never
    objective.on_step(1)
    with CollectiveGuard(lazy) as guard:
        n = objective.maybe_restart_dead_codes({"model": SimpleNamespace(module=model)}, batch)
    assert n == 12 and guard.errors == []
    assert [c[:2] for c in guard.calls] == [
        ("all_reduce", "torch.float64"),
        ("broadcast", "torch.float32"),
    ]


def _copy_param(param, value):  # no DeepSpeed optimizer here: the module copy only
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


# ---- every objective, for real -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from data_pipeline.digits import DigitsConfig, build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=str(out), photos=0), log=lambda *_: None)
    return out


def objective_config(objective: str, storage: Path, digits: Path, *extra: str) -> TrainConfig:
    """A tiny config of `objective` (the GPU smoke run's sizes), 1 worker, fp32, batch 8."""
    name, overrides = tiny_overrides(objective, str(digits))
    smaller = ["dvae.vocab_size=32"] if objective == "dvae" else []
    return load_config(
        TrainConfig,
        CONFIGS / name,
        [
            f"name={objective}",
            f"checkpoint.storage_path={storage}",
            "scaling.num_workers=1",
            "engine.precision=fp32",
            "log_every=1",
            "checkpoint.every_steps=2",
            "checkpoint.keep=0",
            "failure_max_retries=0",
            "optimizer.warmup_steps=1",
            "data.batch_size=8",
            *overrides,
            *smaller,
            *extra,
        ],
    )


def run_in_process(cfg: TrainConfig, monkeypatch) -> list[dict]:
    """`train_loop_per_worker` in this process as rank 0 of 1: Ray Train's context, dataset
    shard and report replaced by what they hand the loop. Returns the reported metrics."""
    import ray.train

    from trainer.launch import absolutize
    from trainer.objectives import build_objective

    cfg = absolutize(cfg)
    storage = SimpleNamespace(
        storage_filesystem=pafs.LocalFileSystem(),
        experiment_fs_path=f"{cfg.checkpoint.storage_path}/{cfg.name}",
    )
    ctx = SimpleNamespace(
        get_world_rank=lambda: 0, get_world_size=lambda: 1, get_storage=lambda: storage
    )
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(k, v)  # what Ray Train's worker sets for DeepSpeed
    reports: list[dict] = []
    dataset = build_objective(cfg).dataset()
    monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: dataset)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **_: reports.append(metrics))
    threads = torch.get_num_threads()
    try:
        loop.train_loop_per_worker({"cfg": dataclasses.asdict(cfg)})
    finally:
        torch.set_num_threads(threads)
    return reports


EVERY_OBJECTIVE = ["dalle", "ldm", "clip", "dvae", "vqgan", "klae"]


def test_the_guard_covers_every_registered_objective():
    from trainer.objectives import OBJECTIVES

    assert sorted(EVERY_OBJECTIVE) == sorted(OBJECTIVES)


@pytest.mark.slow
@pytest.mark.parametrize("objective", EVERY_OBJECTIVE)
def test_every_objective_steps_saves_and_resumes_on_the_engine_device(
    ray_local, world_of_one, digits, tmp_path, monkeypatch, objective
):
    """Two steps and a checkpoint, then a third step resumed from it, with every collective
    (ours and DeepSpeed's) checked against the engine's device."""
    from trainer.objectives import OBJECTIVES

    assert objective in OBJECTIVES
    guard = CollectiveGuard(torch.device("cpu"))
    with guard:
        first = run_in_process(
            objective_config(objective, tmp_path, digits, "steps=2"), monkeypatch
        )
        again = run_in_process(
            objective_config(objective, tmp_path, digits, "steps=3"), monkeypatch
        )
    assert [m["step"] for m in first] == [1, 2] and [m["step"] for m in again] == [3]
    assert guard.errors == []
    ours = {c[0] for c in guard.calls if c[2].endswith(os.path.join("trainer", "distributed.py"))}
    assert "all_reduce" in ours, guard.calls  # the finiteness flags and metric sums
    state = json.loads(
        (tmp_path / objective / "checkpoints" / "step_00000003" / "train_state.json").read_text()
    )
    assert state["step"] == 3
    if objective == "vqgan":  # the dead-code restart's reduction ran, on the model's device
        assert any(c[2].endswith("vqgan.py") for c in guard.calls), guard.calls


# ---- resume is decided once ---------------------------------------------------------------------


def write_checkpoint(run: fs.Location, step: int, world: int) -> None:
    """A complete checkpoint as `save` lays it out (DeepSpeed files stand in as bytes)."""
    from safetensors.torch import save_file

    local = Path(ck.staging_dir("fake"))
    for r in range(world):
        shard = local / "ds" / ck.DS_TAG / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": torch.tensor(step), "rank": torch.tensor(r)}, shard)
        save_file({"torch_cpu": torch.get_rng_state()}, str(local / f"rng_rank{r:05d}.safetensors"))
    (local / "train_state.json").write_bytes(ck.state_to_json(ck.TrainState(step=step)))
    dest = run.join("checkpoints", ck.step_dir_name(step))
    ck.write_manifest(dest, step, ck.upload_dir(str(local), dest))


def _resume_rank(rank: int, port: int, storage: str, failing_rank: int, out: str) -> None:
    """One rank of a 2-rank gloo world: resume, with `failing_rank`'s download of the newest
    checkpoint (step 4) failing as a flaky store would. Writes what this rank got to `out`."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    download = ck.download

    def flaky(loc, local_root, *, rank=None):
        if rank == failing_rank and loc.path.endswith(ck.step_dir_name(4)):
            raise OSError(f"injected read error on rank {rank}")
        return download(loc, local_root, rank=rank)

    ck.download = flaky
    loaded: list[str] = []
    engine = SimpleNamespace(
        device=torch.device("cpu"), load_checkpoint=lambda path, **_: loaded.append(path)
    )
    try:
        state = ck.resume({"model": engine}, fs.resolve(storage).join("run"), rank)
        result = {"step": state.step, "loaded": len(loaded)}
    except ck.ResumeError as e:
        result = {"error": str(e)}
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def resume_two_ranks(tmp_path: Path, failing_rank: int, damaged: bool = False) -> list[dict]:
    import torch.multiprocessing as mp

    run = fs.resolve(str(tmp_path)).join("run")
    for step in (2, 4):
        write_checkpoint(run, step, world=2)
    if damaged:  # one byte of rank 1's own shard of step 4 flipped in storage: same size
        shard = run.join("checkpoints", ck.step_dir_name(4), "ds", ck.DS_TAG)
        shard = shard.join("zero_pp_rank_1_mp_rank_00_optim_states.pt")
        data = bytearray(fs.read_bytes(shard))
        data[len(data) // 2] ^= 0xFF
        fs.write_bytes_atomic(shard, bytes(data))
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    port = free_port()
    procs = [
        mp.get_context("spawn").Process(
            target=_resume_rank, args=(r, port, str(tmp_path), failing_rank, outs[r])
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    return [json.loads(Path(o).read_text()) for o in outs]


def test_ranks_never_resume_from_different_checkpoints(tmp_path):
    """Rank 1 cannot read the newest checkpoint (step 4). Before: rank 0 resumed at step 4 and
    rank 1 silently fell back to step 2. Now every rank stops with an error naming step 4."""
    got = resume_two_ranks(tmp_path, failing_rank=1)
    for r in got:
        assert "error" in r, got
        assert "step_00000004" in r["error"] and "rank 1: injected read error" in r["error"]


def test_rank0_skips_a_checkpoint_it_cannot_read_and_every_rank_follows(tmp_path):
    got = resume_two_ranks(tmp_path, failing_rank=0)
    assert got == [{"step": 2, "loaded": 1}, {"step": 2, "loaded": 1}]


def test_a_checkpoint_damaged_on_another_rank_is_skipped_by_every_rank(tmp_path):
    """Rank 1's own shard of the newest checkpoint is damaged (its sha256 fails; rank 0's files
    are fine): both ranks skip it alike and resume from step 2."""
    got = resume_two_ranks(tmp_path, failing_rank=-1, damaged=True)
    assert got == [{"step": 2, "loaded": 1}, {"step": 2, "loaded": 1}]


# ---- every objective's loss, sampler step and EMA on a non-CPU device ---------------------------
#
# Ray Train hands a GPU worker its batches on the GPU (`iter_torch_batches` device "auto"); a
# constant an objective builds on the CPU then meets CUDA tensors and the first step fails. On
# torch's `lazy` device the same mix fails the same way ("Input tensor is not a lazy tensor"), so
# these tests run each objective's real loss + backward, each sampler and the EMA there: model,
# batch and loss on `lazy`, with the collectives they call checked by the guard.


@pytest.fixture
def lazy_ops(lazy, monkeypatch):
    """Two gaps of torch 2.14's lazy TorchScript backend, bridged for these tests only (neither
    hides a device mix: each still runs on, and requires, lazy tensors): a convolution or matmul
    fed by a `chunk`/`unbind` output fails with "Input tensor is not a lazy tensor" even when
    every input is lazy (`narrow` slices work), and `convolution_backward` asserts when asked
    for the weight gradient alone (`torch.nn.grad.conv2d_weight`)."""
    from torch.nn.modules.utils import _pair

    chunk = torch.Tensor.chunk

    def lazy_chunk(t, chunks, dim=0):
        if t.device.type != "lazy":
            return chunk(t, chunks, dim)
        n = t.shape[dim]
        step = -(-n // chunks)
        return tuple(t.narrow(dim, s, min(step, n - s)) for s in range(0, n, step))

    def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
        weight = input.new_zeros(weight_size)
        return torch.ops.aten.convolution_backward(
            grad_output, input, weight, [weight_size[0]], _pair(stride), _pair(padding),
            _pair(dilation), False, [0, 0], groups, [True, True, True],
        )[1]  # fmt: skip

    unbind = torch.Tensor.unbind

    def lazy_unbind(t, dim=0):
        if t.device.type != "lazy":
            return unbind(t, dim)
        return tuple(t.select(dim, i) for i in range(t.shape[dim]))

    monkeypatch.setattr(torch.Tensor, "unbind", lazy_unbind)
    monkeypatch.setattr(torch.Tensor, "chunk", lazy_chunk)
    monkeypatch.setattr(torch, "chunk", lazy_chunk)
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", conv2d_weight)
    return lazy


class LazyEngine:
    """What an objective's `loss` uses of a DeepSpeed engine: `engine(...)` and `.module`."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def lazy_batch(objective, cfg: TrainConfig, device, b: int = 4) -> dict[str, torch.Tensor]:
    """A micro-batch of `objective` as Ray Train delivers it: every column on `device`."""
    from data_pipeline import token_dataset as T

    g = torch.Generator().manual_seed(0)
    if cfg.objective == "dalle":
        m = cfg.dalle
        batch = {
            T.TEXT_TOKENS: torch.randint(1, m.text_vocab, (b, m.text_len), generator=g),
            T.IMAGE_CODES: torch.randint(0, m.image_vocab, (b, m.image_grid**2), generator=g),
        }
    elif cfg.objective == "ldm":
        c, h, w = cfg.unet.latent_shape
        batch = {
            T.LATENT: torch.randn(b, c, h, w, generator=g).half(),
            T.TEXT_EMBEDDING: torch.randn(b, 8, cfg.unet.cross_attention_dim, generator=g),
            T.TEXT_MASK: torch.ones(b, 8, dtype=torch.bool),
        }
    else:
        size = objective.image_size if cfg.objective == "clip" else cfg_image_size(cfg)
        batch = {PIXELS: torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)}
        if cfg.objective == "clip":
            from trainer.objectives.clip import TEXT

            batch[TEXT] = torch.randint(1, 100, (b, objective.context), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def cfg_image_size(cfg: TrainConfig) -> int:
    return getattr(cfg, cfg.objective).image_size


def assert_on(device, loss, metrics):
    assert loss.device.type == device.type, loss.device
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            assert v.device.type == device.type, f"metric {k} on {v.device}"


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (objective, device, precision). `lazy` computes (on this CPU, through TorchScript): objectives
# with data-dependent ops (code histograms, dead-code restarts) run there, in fp32 (each extra
# graph costs seconds). `meta` computes nothing and costs nothing: the U-Net, CLIP and KL-AE run
# there in all three precisions. On both, a non-0-dim CPU tensor mixed in raises, as on CUDA.
DEVICE_CASES = [
    ("dalle", "lazy", "fp32"),
    ("dalle", "lazy", "bf16"),
    ("dalle", "lazy", "fp16"),
    ("dvae", "lazy", "fp32"),
    ("vqgan", "lazy", "fp32"),
    *[(o, "meta", p) for o in ("ldm", "clip", "klae") for p in PRECISIONS],
]


def test_the_device_cases_cover_every_objective_and_precision():
    from trainer.objectives import OBJECTIVES

    assert {c[0] for c in DEVICE_CASES} == set(OBJECTIVES)
    assert {c[2] for c in DEVICE_CASES} == set(PRECISIONS)


@pytest.mark.parametrize("objective,device,precision", DEVICE_CASES)
def test_every_objective_loss_runs_on_a_non_cpu_device(
    world_of_one, lazy, lazy_ops, monkeypatch, tmp_path, objective, device, precision
):
    """Model (in the run's precision), batch, loss, metrics and gradients all on a non-CPU
    device: a CPU constant in any loss (clip's mean/std and label arange before) fails here."""
    from trainer.engine import MODEL
    from trainer.objectives import build_objective

    dev = torch.device(device, 0) if device == "lazy" else torch.device(device)
    cfg = objective_config(objective, tmp_path, tmp_path / "unused")
    obj = build_objective(cfg)
    torch.manual_seed(0)
    dtype = PRECISIONS[precision]
    if hasattr(obj, "parts"):
        parts = {p: m.to(dev, dtype) for p, m in obj.build_parts().items()}
        engines = {p: LazyEngine(m, dev) for p, m in parts.items()}
        monkeypatch.setattr("trainer.objectives.vqgan.set_full_param", _copy_param)
    else:
        model = obj.build_model().to(dev, dtype)
        engines = {MODEL: LazyEngine(model, dev)}
    for cb in getattr(obj, "callbacks", ()):
        if hasattr(cb, "on_engines"):
            cb.on_engines(engines, 0, 1)
    batch = lazy_batch(obj, cfg, dev)
    if hasattr(obj, "on_step"):
        obj.on_step(1)
    with CollectiveGuard(dev) as guard:
        for part in getattr(obj, "parts", (None,)):
            if part is None:
                loss, metrics = obj.loss(engines[MODEL], batch)
            else:
                loss, metrics = obj.loss(engines, batch, part)
            assert_on(dev, loss, metrics)
            loss.backward()  # (lazy records ops; a device mix fails as it is recorded)
        ema = getattr(obj, "ema", None)
        if ema is not None:  # ldm's EMA: its update and checkpoint state
            ema.on_step_end(engines, 1)
            assert ema.shadow and all(t.device.type == device for t in ema.shadow.values())
    grads = [p.grad for e in engines.values() for p in e.module.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device for g in grads)
    assert guard.errors == []
    if objective == "vqgan":  # the dead-code restart's collectives ran, on the device
        assert [c[0] for c in guard.calls] == ["all_reduce", "broadcast"]


def test_ar_sampler_steps_on_a_non_cpu_device(lazy, lazy_ops):
    """KV-cache prefill, decode steps and the top-k/top-p draw with the model and the text on
    `lazy` (recorded, not run: a device mix fails as it is recorded)."""
    from trainer.models.dalle import DalleTransformer, dalle_preset
    from trainer.sampling.ar import sample_codes

    torch.manual_seed(0)
    model = DalleTransformer(dalle_preset("tiny", image_grid=2, depth=2)).eval()
    c = model.cfg
    text = torch.randint(1, c.text_vocab, (2, c.text_len), generator=torch.Generator().manual_seed(1))
    got = sample_codes(model.to(lazy), text.to(lazy), [5, 6], top_k=8, top_p=0.9)
    assert got.device.type == "lazy" and got.shape == (2, c.image_len)


class EpsModel(torch.nn.Module):
    """A stand-in U-Net (the sampler's contract: (z_t, t, text, mask) -> eps); it checks that
    every input is on its parameter's device."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, z, t, text, mask):
        for x in (z, t, text, mask):
            assert x.device == self.w.device, x.device
        return z * self.w + text.float().mean() * mask.float().mean() + t.float().mean() * 1e-4


def test_ldm_sampler_steps_on_a_non_cpu_device(lazy):
    """DDIM with classifier-free guidance: latents, timesteps, text and masks handed to the model
    on its device, the result on it too."""
    from trainer.diffusion import NoiseSchedule
    from trainer.sampling.ldm import build_scheduler, sample_latents

    sched = build_scheduler("ddim", NoiseSchedule().scheduler_config("epsilon"))
    model = EpsModel().to(lazy)
    text = torch.randn(2, 3, 4).to(lazy)
    mask = torch.ones(2, 3, dtype=torch.bool).to(lazy)
    z = sample_latents(
        model,
        sched,
        text,
        mask,
        torch.zeros(3, 4).to(lazy),
        torch.ones(3, dtype=torch.bool).to(lazy),
        latent_shape=(2, 2, 2),
        steps=2,
        guidance=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
    )
    assert z.device.type == "lazy" and z.shape == (2, 2, 2, 2)


def test_gpu_smoke_refuses_without_cuda_and_checks_its_arguments(capsys, monkeypatch):
    """benchmarks/gpu_smoke.py runs only on CUDA; without it, it refuses (exit 2, never the ok
    line)."""
    from benchmarks import gpu_smoke

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert gpu_smoke.parse_args([]).precisions == ["bf16", "fp16"]
    assert gpu_smoke.parse_args(["--precisions", "fp16"]).precisions == ["fp16"]
    with pytest.raises(SystemExit):
        gpu_smoke.parse_args(["--precisions", "fp8"])
    assert gpu_smoke.main([]) == 2
    out = capsys.readouterr().out
    assert "refused" in out and "gpu_smoke_ok" not in out
