"""GPUs follow Ray's reservation (data_pipeline/devices.py).

  * an actor computes on the GPU only when Ray gave it one (`ray.get_gpu_ids()`), never because
    `torch.cuda.is_available()` says the node has one (Ray leaves every GPU visible to actors
    that asked for none);
  * a job requests the configured `num_gpus` whatever the cluster has when it starts (an
    autoscaling cluster's GPU group may be at 0 nodes: the request is what starts one).

Both are decided without a GPU here: `ray.get_gpu_ids`, `torch.cuda.is_available` and
`ray.cluster_resources` are patched, and the Ray Data plans are built on a recording stand-in
for `ray.data.Dataset` (nothing runs).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

from data_pipeline.config import load_config
from data_pipeline.devices import assigned_device

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "jobs" / "configs"


@pytest.fixture
def gpu_node(monkeypatch):
    """A node with GPUs (torch sees one) in a Ray worker; returns a setter of what Ray assigned."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)

    def assign(ids: list[str]):
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: ids)

    assign([])
    return assign


def test_actors_pick_the_gpu_only_when_ray_assigned_one(gpu_node):
    """Before: CLIP scorer, tokenizer stages and sampling actors took the GPU whenever the node
    had one (`torch.cuda.is_available()`), also when they had reserved none."""
    from data_pipeline.tokenize.stages import _device
    from trainer.sampling.run import device_for_this_process

    threads = torch.get_num_threads()
    try:
        assert assigned_device() == "cpu"
        assert _device(1) == "cpu"
        assert device_for_this_process() == "cpu"
        gpu_node(["0"])
        assert assigned_device() == "cuda"
        assert _device(1) == "cuda"
        assert device_for_this_process() == "cuda"
    finally:
        torch.set_num_threads(threads)


def test_clip_scorer_without_a_reserved_gpu_stays_on_the_cpu(gpu_node, monkeypatch):
    """The preprocess CLIP actor builds its model on the device Ray assigned (the model build
    itself is replaced by a recorder: no weights needed)."""
    import data_pipeline.clip_score as cs

    built = []

    def build_clip(spec, device):
        built.append(device)
        return SimpleNamespace(), None, (0.5,) * 3, (0.25,) * 3

    monkeypatch.setattr(cs, "build_clip", build_clip)
    monkeypatch.setattr(cs, "open_clip_config", lambda spec: {"embed_dim": 4})
    spec = SimpleNamespace(threads=torch.get_num_threads())
    assert cs.ClipScorer(spec).device == "cpu"  # before: "cuda" on any GPU node
    assert built == ["cpu"]


# ---- what the jobs request ---------------------------------------------------------------------


class RecordingDataset:
    """Stands in for `ray.data.Dataset`: records each `map_batches` stage's resources."""

    def __init__(self):
        self.stages: list[tuple[str, dict]] = []

    def flat_map(self, *_, **__):
        return self

    def map_batches(self, fn, **kwargs):
        name = getattr(fn, "__name__", type(fn).__name__)
        self.stages.append((name, kwargs))
        return self

    def iter_rows(self):
        return iter(())

    def gpus(self) -> dict[str, float]:
        return {n: k["num_gpus"] for n, k in self.stages if "num_gpus" in k}


@pytest.fixture
def cpu_only_cluster(monkeypatch):
    """`ray.cluster_resources()` of an autoscaling cluster whose GPU group is at 0 nodes."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    ds = RecordingDataset()
    monkeypatch.setattr(ray.data, "from_items", lambda *_, **__: ds)
    return ds


def test_preprocess_requests_the_configured_gpus(cpu_only_cluster, tmp_path):
    """Before: `num_gpus=cfg.clip.num_gpus if the cluster has GPUs else 0`: no GPU was ever
    requested on a cluster that starts without GPU nodes."""
    from data_pipeline.preprocess.config import PreprocessConfig
    from data_pipeline.preprocess.job import _phase_score, build_context
    from tests.data_pipeline.preprocess_fixtures import sample, write_tar

    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "00000.tar", sample("a", 0))
    cfg = load_config(
        PreprocessConfig,
        CONFIGS / "preprocess_digits.yaml",
        [f"input={shards}", f"output={tmp_path / 'out'}", "clip.checkpoint=", "clip.num_gpus=1"],
    )
    _phase_score(build_context(cfg, log=lambda *_: None))
    assert cpu_only_cluster.gpus() == {"ClipScorer": 1}


def test_preprocess_defaults_to_cpu_actors(cpu_only_cluster, tmp_path):
    from data_pipeline.preprocess.config import PreprocessConfig

    cfg = load_config(PreprocessConfig, CONFIGS / "preprocess_digits.yaml", ["input=x", "output=y"])
    assert cfg.clip.num_gpus == 0  # bundled / default configs run on CPU-only machines


def test_tokenize_requests_the_configured_gpus(cpu_only_cluster, tmp_path):
    from data_pipeline import fs
    from data_pipeline.text_tokens import TextTokenizer
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import _build_plan, _Ctx
    from data_pipeline.webdataset_source import ReaderLimits

    cfg = load_config(
        TokenizeConfig,
        CONFIGS / "tokenize_digits_latent.yaml",
        [
            "input=x",
            f"output={tmp_path}",
            "text_encoder.checkpoint=",
            "image_tokenizer.num_gpus=1",
            "text_encoder.num_gpus=0.5",
        ],
    )
    ctx = _Ctx(cfg, fs.resolve(str(tmp_path)), ["x"], ReaderLimits.of(), print, None)
    _build_plan(ctx, [{}], TextTokenizer.open_clip(16))
    assert cpu_only_cluster.gpus() == {"EncodeImages": 1, "EmbedText": 0.5}


def test_sampling_and_eval_request_the_configured_gpus(monkeypatch):
    from trainer.sampling.run import run_as_ray_task

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    asked = {}

    class Stop(Exception):
        pass

    def remote(fn):
        def options(**kw):
            asked.update(kw)
            raise Stop

        return SimpleNamespace(options=options)

    monkeypatch.setattr(ray, "remote", remote)
    with pytest.raises(Stop):
        run_as_ray_task(lambda d: d, SimpleNamespace(), num_cpus=1, num_gpus=1)
    assert asked["num_gpus"] == 1


def test_tf32_only_on_cuda():
    from data_pipeline.devices import enable_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not enable_tf32("cpu") and torch.get_float32_matmul_precision() == "highest"
        assert enable_tf32("cuda") and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_cpu_sampling_actor_on_a_gpu_node_picks_a_cpu_precision(monkeypatch):
    """precision auto follows the device the actor computes on. Before: a CPU actor on a node
    with a GPU without native bf16 loaded the DALL-E in fp16 (the GPU's choice) on the CPU."""
    from trainer.sampling import ar

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    dalle = SimpleNamespace(text_len=8, text_vocab=64, image_vocab=16)
    monkeypatch.setattr(
        ar, "load_dalle", lambda *a: (torch.nn.Linear(2, 2), SimpleNamespace(dalle=dalle))
    )
    monkeypatch.setattr(
        "data_pipeline.text_tokens.load_text_tokenizer",
        lambda *a: SimpleNamespace(text_len=8, vocab_size=10),
    )
    monkeypatch.setattr(
        "trainer.pretrained.image_tokenizers.load_image_tokenizer",
        lambda *a, **k: SimpleNamespace(discrete=True, vocab_size=16, fingerprint="f", kind="x"),
    )
    monkeypatch.setattr(ar, "check_same_tokenizer", lambda *a: None)
    cfg = SimpleNamespace(model="m", storage=None, tokens="t", image_tokenizer="i", precision="auto")
    model, _, _ = ar.load_ar_models(cfg, "cpu")
    assert next(model.parameters()).dtype in (torch.bfloat16, torch.float32)
