"""`t2i sample recipe=ldm` on a tiny random latent-diffusion setup: determinism per seed, batch
independence, sharding over Ray actors (every candidate exactly once), text-encoder checks, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.trainer.sample_fixtures import make_ldm_inputs, sample_config
from trainer.sampling.common import Chunk, assemble
from trainer.sampling.config import SampleConfig
from trainer.sampling.run import run_sample, sample_on_ray


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_ldm_inputs(tmp_path_factory.mktemp("ldm-inputs"))


def make_cfg(inputs, out, *overrides) -> SampleConfig:
    """`sample_config` with 3 denoising steps and no CLIP rerank."""
    return sample_config(inputs, out, "sample.steps=3", "clip.enabled=false", *overrides)


def pngs(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def pixels(out) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))])


def test_same_seed_gives_identical_pngs(one_thread, inputs, tmp_path):
    quiet = {"log": lambda *_: None}
    run_sample(make_cfg(inputs, tmp_path / "a", "sample.batch_size=9"), **quiet)
    run_sample(make_cfg(inputs, tmp_path / "a2", "sample.batch_size=9"), **quiet)
    run_sample(make_cfg(inputs, tmp_path / "b", "sample.batch_size=2"), **quiet)
    run_sample(make_cfg(inputs, tmp_path / "c", "sample.seed=5"), **quiet)
    a, c = pngs(tmp_path / "a"), pngs(tmp_path / "c")
    assert len(a) == 6 and a == pngs(tmp_path / "a2")  # 3 prompts x keep 2, byte-identical
    assert a != c
    # Each candidate's noise is its own seed's, whatever its batch: other batching changes only
    # the rounding of batched matmuls (a pixel level or so), not the image.
    diff = np.abs(pixels(tmp_path / "a").astype(int) - pixels(tmp_path / "b").astype(int))
    assert diff.max() <= 3, diff.max()
    assert (
        np.abs(pixels(tmp_path / "a").astype(int) - pixels(tmp_path / "c").astype(int)).max() > 20
    )
    rows = [json.loads(x) for x in (tmp_path / "a/samples.jsonl").read_text().splitlines()]
    assert {r["recipe"] for r in rows} == {"ldm"}
    assert set(rows[0]) >= {"recipe", "prompt", "path", "rank", "clip_score", "seed"}
    # DDPM and guidance 1 run too (the scheduler choice reaches the sampler)
    run_sample(make_cfg(inputs, tmp_path / "d", "sample.scheduler=ddpm", "sample.guidance=1.0"),
               **quiet)  # fmt: skip
    assert pngs(tmp_path / "d") != a


def test_text_encoder_must_be_the_datasets(one_thread, inputs, tmp_path):
    other = tmp_path / "other_clip.safetensors"
    other.write_bytes(b"not the encoder the latents were built with")
    with pytest.raises(ValueError, match=r"text_encoder .*other_clip.*sha256"):
        run_sample(make_cfg(inputs, tmp_path / "x", f"text_encoder={other}"),
                   log=lambda *_: None)  # fmt: skip


def test_assemble_takes_every_row_exactly_once():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    chunk = lambda rows: Chunk(rows, np.repeat(img, len(rows), 0), np.arange(len(rows)))  # noqa: E731
    cand = assemble([chunk([(0, 1), (1, 0)]), chunk([(0, 0), (1, 1)])], 2, 2)
    assert cand.seeds.tolist() == [[0, 0], [1, 1]]
    with pytest.raises(RuntimeError, match="candidate 0 of prompt 0 generated twice"):
        assemble([chunk([(0, 0), (0, 1)]), chunk([(0, 0)])], 1, 2)
    with pytest.raises(RuntimeError, match="candidate 1 of prompt 1 was never generated"):
        assemble([chunk([(0, 0), (0, 1), (1, 0)])], 2, 2)


@pytest.mark.slow
def test_sharded_over_ray_actors_equals_in_process(ray_local, inputs, tmp_path):
    run_sample(make_cfg(inputs, tmp_path / "local", "sample.batch_size=2"), log=lambda *_: None)
    summary = sample_on_ray(
        make_cfg(inputs, tmp_path / "ray", "sample.workers=2", "sample.batch_size=2")
    )
    assert summary["candidates"] == 9 and summary["images"] == 6
    # same chunks as in-process (batch_size 2): byte-identical images
    assert pngs(tmp_path / "ray") == pngs(tmp_path / "local")
    rows = [json.loads(x) for x in (tmp_path / "ray/samples.jsonl").read_text().splitlines()]
    assert sorted((r["prompt_index"], r["rank"]) for r in rows) == [
        (p, k) for p in range(3) for k in (1, 2)
    ]


@pytest.mark.parametrize("folder", [False, True])
def test_text_encoder_sha256_matches_tokenize_for_file_and_folder(tmp_path, folder):
    """An open_clip release folder as text encoder: sampling hashes its weights file, as
    tokenize recorded it (`check_checkpoint`), not the folder's whole tree (#27)."""
    from types import SimpleNamespace

    from data_pipeline import fs
    from trainer.sampling.ldm import text_encoder_checkpoint

    root = tmp_path / "open_clip_release"
    root.mkdir()
    weights = root / "open_clip_model.safetensors"
    weights.write_bytes(b"weights bytes")  # hashed, not parsed
    (root / "open_clip_config.json").write_text('{"model_cfg": {}}')
    ckpt = str(root if folder else weights)
    manifest = {"text_encoder": {"model": "ViT-B-32", "checkpoint": ckpt,
                                 "checkpoint_sha256": fs.file_digest(str(weights))[1]}}  # fmt: skip
    cfg = SimpleNamespace(text_encoder="", storage=None, tokens="latents")
    assert text_encoder_checkpoint(cfg, manifest) == ckpt  # the folder itself: its json says more
    manifest["text_encoder"]["checkpoint_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        text_encoder_checkpoint(cfg, manifest)
