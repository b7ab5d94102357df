"""`t2i tokenize`: determinism, resume after a kill, S3, manifest checks, codes round trip."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import fs
from data_pipeline.config import load_config, to_yaml
from data_pipeline.manifest import ManifestError
from data_pipeline.shards import write_shards
from data_pipeline.token_dataset import check_compatible, read_token_dataset
from data_pipeline.tokenize.config import TokenizeConfig
from data_pipeline.tokenize.job import run_tokenize
from data_pipeline.tokenize.writer import DONE_DIR, PARTS_DIR
from tests.s3_fault_proxy import FaultProxy, combine, every
from trainer.config import TrainConfig
from trainer.models.dvae import DvaeConfig, DvaeTokenizer
from trainer.pretrained.image_tokenizers import load_image_tokenizer

SIZE = 16
WORDS = ("zero", "one", "two", "three", "four")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (SIZE + 4, SIZE, 3), dtype=np.uint8)  # not square: crop path
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """3 clean shards (10 + 10 + 4 samples, one undecodable) and a tiny random dVAE."""
    root = tmp_path_factory.mktemp("tokenize")
    samples = []
    for i in range(24):
        image = b"not an image" if i == 13 else _png(i)
        caption = f"a picture of the digit {WORDS[i % 5]} number {i}"
        samples.append((f"s{i:04d}", {"png": image, "txt": caption.encode()}))
    write_shards(fs.resolve(str(root / "clean")), samples, samples_per_shard=10)
    torch.manual_seed(0)
    cfg = DvaeConfig(image_size=SIZE, group_count=2, n_hid=16, n_blk_per_group=1, n_init=16,
                     vocab_size=64)  # fmt: skip
    tok_dir = root / "dvae"
    tok_dir.mkdir()
    from safetensors.torch import save_file

    save_file(DvaeTokenizer(cfg).state_dict(), str(tok_dir / "model.safetensors"))
    (tok_dir / "config.yaml").write_text(to_yaml(TrainConfig(name="t", objective="dvae", dvae=cfg)))
    return {"root": root, "clean": str(root / "clean"), "tokenizer": str(tok_dir)}


def _overrides(data: dict, output: str, *extra: str) -> list[str]:
    return [
        f"input={data['clean']}",
        f"output={output}",
        f"image_size={SIZE}",
        "rows_per_shard=4",
        "decode_batch_size=4",
        "text_tokenizer.vocab_size=300",
        "text_tokenizer.text_len=8",
        f"image_tokenizer.path={data['tokenizer']}",
        "image_tokenizer.batch_size=4",
        *extra,
    ]


def _cfg(data: dict, output: str, *overrides: str) -> TokenizeConfig:
    return load_config(TokenizeConfig, None, _overrides(data, output, *overrides))


def _files(out: Path) -> dict[str, bytes]:
    """The manifest and every file it lists, by relative path."""
    manifest = json.loads((out / "manifest.json").read_text())
    names = ["manifest.json", "text_tokenizer.json", "quarantine.parquet"]
    names += [s["path"] for s in manifest["shards"]]
    return {n: (out / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def reference(data, ray_local) -> dict:
    out = data["root"] / "ref"
    manifest = run_tokenize(_cfg(data, str(out)), log=lambda *_: None)
    return {"out": out, "manifest": manifest, "files": _files(out)}


def test_manifest_accounts_for_every_sample(reference):
    m = reference["manifest"]
    assert m["format"] == "ray-t2i/tokens" and m["version"] == 1
    assert m["exactly_once"] == {"rows_in": 24, "quarantined": 1, "rows": 23, "unique_keys": True}
    assert m["quarantine"]["reasons"] == {"undecodable_image": 1}
    assert sum(s["rows"] for s in m["shards"]) == 23 and max(s["rows"] for s in m["shards"]) == 4
    assert (m["text_vocab"], m["text_len"], m["text_pad_id"]) == (300, 8, 0)
    assert (m["image_vocab"], m["image_grid"], m["image_codes_dtype"]) == (64, 8, "int16")
    assert m["image_tokenizer"]["kind"] == "dvae" and len(m["image_tokenizer"]["fingerprint"]) == 64
    assert not (reference["out"] / "_work").exists()
    import hashlib

    for s in m["shards"]:
        assert hashlib.sha256(reference["files"][s["path"]]).hexdigest() == s["sha256"]


def test_rows_round_trip_through_the_tokenizer(data, reference):
    """Stored codes decode to the same reconstruction as encoding the source image directly."""
    import pyarrow.parquet as pq

    from data_pipeline.text_tokens import load_text_tokenizer
    from data_pipeline.validate import decode_image, resize_center_crop

    out = reference["out"]
    table = pq.read_table(out / reference["manifest"]["shards"][1]["path"])
    tok = load_image_tokenizer(data["tokenizer"])
    text = load_text_tokenizer(str(out))
    keys = table["key"].to_pylist()
    assert keys == sorted(keys) and "s0013" not in keys
    rows = table.to_pylist()
    codes = torch.tensor([r["image_codes"] for r in rows]).view(len(rows), 8, 8)
    pixels = []
    for r in rows:
        rgb, _, _ = decode_image(_png(int(r["key"][1:])), 10**8)
        pixels.append(resize_center_crop(Image.fromarray(rgb), SIZE))
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    direct = tok.encode(images)
    torch.testing.assert_close(codes, direct)
    torch.testing.assert_close(tok.decode(codes), tok.decode(direct))
    assert [r["text_tokens"] for r in rows] == text.encode([r["caption"] for r in rows]).tolist()


def test_rerun_after_kill_is_byte_identical(data, reference, killed_job):
    """The CLI's driver SIGKILLed mid-encode, then mid-write; a rerun with changed settings is
    refused, and one with the same settings completes the output, byte-identical to an
    uninterrupted run."""
    out = data["root"] / "killed"
    args = _overrides(data, str(out))
    killed_job("tokenize", args, "parts", 1)  # exactly one part committed, no shard
    assert len(list((out / PARTS_DIR).glob("*.parquet"))) == 1
    assert not (out / DONE_DIR).exists()
    stdout = killed_job("tokenize", args, "shards", 1)  # exactly one shard committed
    assert "resuming unfinished work" in stdout
    assert len(list((out / DONE_DIR).glob("*.json"))) == 1
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="unfinished work"):  # changed settings do not mix in
        run_tokenize(_cfg(data, str(out), "rows_per_shard=5"), log=lambda *_: None)
    logs: list[str] = []
    run_tokenize(_cfg(data, str(out)), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert _files(out) == reference["files"]


def test_s3_in_and_out(data, reference, s3_bucket, s3_fault_proxy):
    """Input, image tokenizer and output on S3, every request through a proxy that answers 503,
    resets connections and answers late: the retries complete it, byte-identical to the local
    run (the manifest and quarantine name their inputs, so they differ by those paths)."""
    import boto3

    s3 = boto3.client("s3")  # straight to moto, no faults
    for path in sorted(Path(data["clean"]).glob("*.tar")):
        s3.upload_file(str(path), s3_bucket, f"clean/{path.name}")
    for path in sorted(Path(data["tokenizer"]).iterdir()):
        s3.upload_file(str(path), s3_bucket, f"dvae/{path.name}")
    cfg = _cfg(data, f"s3://{s3_bucket}/tokens", f"input=s3://{s3_bucket}/clean",
               f"image_tokenizer.path=s3://{s3_bucket}/dvae",
               f"storage.endpoint_url={s3_fault_proxy.url}")  # fmt: skip
    manifest = run_tokenize(cfg, log=lambda *_: None)
    seen = dict(s3_fault_proxy.seen)
    assert min(seen.get(f, 0) for f in ("503", "reset", "delay")) >= 1, seen
    ref = reference["manifest"]
    assert manifest["shards"] == [
        {**s, "source_shard": f"s3://{s3_bucket}/clean/{Path(s['source_shard']).name}"}
        for s in ref["shards"]
    ]
    assert manifest["text_tokenizer"] == ref["text_tokenizer"]
    for name in ["text_tokenizer.json", *(s["path"] for s in ref["shards"])]:
        body = s3.get_object(Bucket=s3_bucket, Key=f"tokens/{name}")["Body"].read()
        assert body == reference["files"][name], name
    ds, m2 = read_token_dataset(f"s3://{s3_bucket}/tokens")
    batch = ds.take_batch(100)
    assert batch["image_codes"].shape == (23, 64) and batch["text_tokens"].shape == (23, 8)
    assert m2["rows"] == 23


def test_storage_settings_reach_the_tasks(s3_server, s3_bucket):
    """Issue #16: tokenize's tasks and model actors get the job's whole `storage` section. Every
    request answered 503 and storage.max_attempts=1: each one gives up after exactly one request
    (with the default, 10, it would send each request 10 times)."""
    from data_pipeline import columns as C
    from data_pipeline.tokenize.job import _captions_task, _Ctx
    from data_pipeline.tokenize.stages import EncodeImages, ImageEncoderSpec
    from data_pipeline.tokenize.writer import write_tokenized_shard
    from data_pipeline.webdataset_source import ReaderLimits, StorageReadError

    with FaultProxy(s3_server, combine(every(1, 0, "503"))) as proxy:
        out = f"s3://{s3_bucket}/tokens"
        overrides = [f"input=s3://{s3_bucket}/a.tar", f"output={out}",
                     f"image_tokenizer.path=s3://{s3_bucket}/dvae",
                     f"storage.endpoint_url={proxy.url}", "storage.max_attempts=1"]  # fmt: skip
        cfg = load_config(TokenizeConfig, None, overrides)
        ctx = _Ctx(cfg, fs.resolve(out, storage=cfg.storage), [], ReaderLimits.of(), print, None)
        item = {"i": 0, "uri": f"s3://{s3_bucket}/a.tar"}
        with pytest.raises(StorageReadError, match=r"a\.tar: cannot open the shard"):
            _captions_task(item, limits=ctx.limits, **ctx.storage)  # an error, never no rows
        assert proxy.seen["503"] == 1, dict(proxy.seen)
        with pytest.raises(OSError):
            parts = json.dumps([f"{s3_bucket}/tokens/{PARTS_DIR}/part-x.parquet"])
            shard = {C.SHARD_IDX: 0, C.SOURCE_SHARD: item["uri"], "parts": parts}
            write_tokenized_shard(shard, out_uri=out, recipe="dalle", rows_per_shard=5,
                                  **ctx.storage)  # fmt: skip
        assert proxy.seen["503"] == 2, dict(proxy.seen)
        with pytest.raises(OSError):
            EncodeImages(ImageEncoderSpec(cfg.image_tokenizer.path, cfg.storage, 4, 1))
        assert proxy.seen["503"] == 3, dict(proxy.seen)


def test_reader_refuses_unknown_version_and_mismatched_model(reference, tmp_path):
    m = reference["manifest"]
    with pytest.raises(ValueError, match=r"dalle-run.*image_grid=8.*image_grid=16"):
        check_compatible(m, text_vocab=300, text_len=8, image_vocab=64, image_grid=16,
                         source="dalle-run")  # fmt: skip
    with pytest.raises(ValueError, match=r"text_vocab=300.*text_vocab=1024"):
        check_compatible(m, text_vocab=1024, text_len=8, image_vocab=64, image_grid=8)
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "version": 7}))
    with pytest.raises(ManifestError, match=r"manifest\.json.*version 7"):
        read_token_dataset(str(tmp_path))


def test_ldm_text_states_pool_to_the_clip_text_embedding():
    """The per-token states we store are exactly what open_clip pools into its text embedding."""
    import open_clip

    from data_pipeline.clip_score import ClipSpec, build_clip, load_model_config_file
    from data_pipeline.text_tokens import TextTokenizer
    from data_pipeline.tokenize.stages import text_token_states

    spec = ClipSpec("clip_digits_tiny", load_model_config_file("jobs/configs/clip_digits_tiny.json"),
                    "", 4, 1)  # fmt: skip
    model = build_clip(spec)[0]
    ids = torch.from_numpy(TextTokenizer.open_clip(16).encode(["a digit seven", "two"])).long()
    with torch.inference_mode():
        states = text_token_states(model, ids)  # (B, L, W)
        pooled = open_clip.model.text_global_pool(
            states, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        got, want = pooled @ model.text_projection, model.encode_text(ids)
    assert states.shape == (2, 16, 128)
    torch.testing.assert_close(got, want)


def test_digits_configs_load():
    for name in ("tokenize_digits", "tokenize_digits_latent"):
        cfg = load_config(TokenizeConfig, f"jobs/configs/{name}.yaml")
        assert cfg.output.startswith("runs/demo/")
