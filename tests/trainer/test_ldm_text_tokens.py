"""`t2i tokenize recipe=ldm text=tokens`: rows carry ids only, the trainer encodes them with the
dataset's frozen text encoder; the conditioning equals the states `text=states` stores (its stage,
`EmbedText`, over the same ids), the run trains (Ray Train + DeepSpeed) and `t2i sample` samples
from it. One tokenize, one 1-worker fit: the rest of the recipe is tested in test_ldm.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _tokenize(root: Path, text: str, klae: Path):
    from data_pipeline.config import load_config
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize
    from tests.trainer.sample_fixtures import LDM_TEXT_LEN

    cfg = load_config(TokenizeConfig, None, [
        f"input={root / 'digits/val'}", f"output={root / text}", "recipe=ldm", f"text={text}",
        "image_size=32", "text_tokenizer.kind=open_clip", f"text_tokenizer.text_len={LDM_TEXT_LEN}",
        f"image_tokenizer.path={klae}", "image_tokenizer.batch_size=32",
        "text_encoder.model=tiny_clip", f"text_encoder.model_config={root / 'tiny_clip.json'}",
        "text_encoder.batch_size=32", "text_encoder.allow_random=true",
    ])  # fmt: skip
    return run_tokenize(cfg, log=lambda *_: None)


def _rows(root: Path, manifest: dict) -> dict:
    """Every row of a dataset's shards, read directly: keys as a list, payloads as arrays."""
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(root / s["path"]) for s in manifest["shards"]])
    return {c: table[c].to_pylist() if c == "key" else np.asarray(table[c].to_pylist())
            for c in table.column_names}  # fmt: skip


def _train_cfg(tmp_path: Path, data: Path, *overrides: str):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig

    return load_config(
        TrainConfig,
        REPO / "jobs/configs/ldm_tiny.yaml",
        [f"checkpoint.storage_path={tmp_path}", "engine.precision=fp32", "data.source=tokens",
         f"data.path={data}", "data.batch_size=8", "failure_max_retries=0", *overrides],
    )  # fmt: skip


@pytest.mark.slow
def test_text_tokens_conditioning_equals_stored_states_trains_and_samples(ray_local, tmp_path):
    from data_pipeline import fs
    from data_pipeline import token_dataset as T
    from data_pipeline.digits import DigitsConfig, build_digits
    from data_pipeline.tokenize.stages import EmbedText, TextEncoderSpec
    from tests.trainer.sample_fixtures import TEXT_ENCODER, make_klae, sample_config
    from trainer.launch import fit
    from trainer.objectives.ldm import LdmObjective
    from trainer.objectives.ldm_text import FrozenTextEncoder, StoredStates
    from trainer.sampling.run import run_sample

    root = tmp_path / "data"
    build_digits(DigitsConfig(out=str(root / "digits"), photos=0, val_fraction=0.02),
                 log=lambda *_: None)  # fmt: skip
    (root / "tiny_clip.json").write_text(json.dumps(TEXT_ENCODER))
    klae = make_klae(root / "klae")
    manifest = _tokenize(root, "tokens", klae)

    # On disk: ids only (no states column); the manifest says so, with the encoder and shapes.
    assert manifest["text"] == "tokens" and T.TEXT_EMBEDDING not in manifest["columns"]
    assert manifest["text_embedding_shape"] == [8, 32] and manifest["text_encoder"]["model"]
    ids = _rows(root / "tokens", manifest)
    assert T.TEXT_EMBEDDING not in ids and len(ids["key"]) >= 20

    # What text=states would store for these rows: its stage (EmbedText) over the same ids.
    enc = manifest["text_encoder"]
    spec = TextEncoderSpec(enc["model"], enc["model_config"], enc["checkpoint"], 32,
                           torch.get_num_threads())  # fmt: skip
    n = 16
    stored = EmbedText(spec).encode(ids[T.TEXT_TOKENS][:n])  # (n, L*D) float16

    # The objective picks its conditioning once from the manifest; the frozen encoder over the
    # stored ids gives those states (fp16 rounding apart), dropped rows the empty caption's
    # states; the encoder holds no trainable weights.
    batch = {T.TEXT_TOKENS: torch.from_numpy(ids[T.TEXT_TOKENS][:n].astype(np.int64))}
    cond = LdmObjective(_train_cfg(tmp_path, root / "tokens")).conditioning("cpu", torch.float32)
    assert isinstance(cond, FrozenTextEncoder)
    want = torch.from_numpy(stored.astype(np.float32)).reshape(n, 8, 32)
    drop = torch.zeros(n, dtype=torch.bool)
    drop[::3] = True
    text, mask = cond(batch, drop)
    assert not text.requires_grad
    keep = ~drop
    torch.testing.assert_close(text[keep], want[keep], rtol=2e-3, atol=2e-3)
    assert torch.equal(mask[keep], batch[T.TEXT_TOKENS][keep] != manifest["text_pad_id"])
    uncond = T.read_empty_caption(fs.resolve(str(root / "tokens")), manifest)
    torch.testing.assert_close(text[drop], torch.from_numpy(uncond[T.TEXT_EMBEDDING])
                               .expand(int(drop.sum()), -1, -1), rtol=2e-3, atol=2e-3)  # fmt: skip
    assert mask[drop].eq(torch.from_numpy(uncond[T.TEXT_MASK])).all()
    synthetic = LdmObjective(_train_cfg(tmp_path, "", "data.source=synthetic"))
    assert isinstance(synthetic.conditioning("cpu", torch.float32), StoredStates)

    # Ray Train + DeepSpeed on the ids: every step encodes on the worker; then `t2i sample`.
    result = fit(_train_cfg(tmp_path, root / "tokens", "name=tok", "steps=2", "log_every=1",
                            "checkpoint.every_steps=2", "scaling.num_workers=1",
                            "ldm.sample_steps=2"))  # fmt: skip
    assert result.error is None, result.error
    run = tmp_path / "tok"
    rows = [json.loads(x) for x in (run / "tensorboard/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    final = run / "checkpoints/step_00000002"
    from safetensors.torch import load_file

    assert all(k.startswith("unet.") for k in load_file(str(final / "model.safetensors")))
    inputs = {"recipe": "ldm", "tokens": str(root / "tokens"), "image_tokenizer": str(klae),
              "model": str(run)}  # fmt: skip
    run_sample(sample_config(inputs, tmp_path / "samples", "sample.steps=2", "clip.enabled=false"),
               log=lambda *_: None)  # fmt: skip
    pngs = sorted((tmp_path / "samples").rglob("*.png"))
    assert len(pngs) >= 3, pngs


def test_frozen_encoder_of_a_pipeline_folder_is_the_pipelines_and_checks_its_sha256(tmp_path):
    """`text: tokens` on a Stable Diffusion folder's dataset (`pretrained:`): the workers' encoder
    is the folder's CLIPTextModel as its pipeline runs it; another weights file is refused."""
    from data_pipeline.tokenize.sd import describe_text_encoder
    from tests.trainer.sd_fixtures import build_tiny_sd
    from trainer.objectives.ldm_text import load_frozen_encoder
    from trainer.pretrained.diffusers_sd import load_text_encoder

    pipe = build_tiny_sd(str(tmp_path / "sd"))
    enc = load_text_encoder(str(tmp_path / "sd"))

    class _Cfg:  # what `describe_text_encoder` reads of a TokenizeConfig
        pretrained, storage = str(tmp_path / "sd"), None

    _, entry = describe_text_encoder(_Cfg, type("Tok", (), {"text_len": enc.text_len})())
    ids, mask = enc.tokenize(["a red digit seven", ""])
    ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask)
    encode = load_frozen_encoder(entry, storage=None, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want = pipe.text_encoder(ids)[0]  # StableDiffusionPipeline.encode_prompt: no mask
    torch.testing.assert_close(encode(ids, mask), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sha256"):
        load_frozen_encoder({**entry, "checkpoint_sha256": "0" * 64}, storage=None,
                            device="cpu", dtype=torch.float32)  # fmt: skip
