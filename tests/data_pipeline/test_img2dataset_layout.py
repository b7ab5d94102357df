"""img2dataset / LAION layout kept end to end by `t2i preprocess` (on S3, moto): brace ranges,
parquet sidecars read and written, every input field kept, filters on kept fields, and an
s3:// CLIP checkpoint whose sha256 the manifest records."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_pipeline import fs
from data_pipeline.config import ConfigError, load_config
from data_pipeline.preprocess.config import PreprocessConfig, check_config
from data_pipeline.preprocess.job import run_preprocess
from data_pipeline.shards import iter_tar_samples, write_shard
from data_pipeline.webdataset_source import expand_braces, list_shards

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def jpg(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (40 + seed % 7, 48, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def laion_fields(key: str, i: int) -> dict:
    """What img2dataset writes for a LAION sample (a subset, with a nested exif)."""
    return {
        "url": f"https://example.com/{key}.jpg", "caption": f"photo number {i}", "key": key,
        "status": "success", "error_message": None, "width": 48, "height": 40 + i % 7,
        "original_width": 640 + i, "original_height": 480, "similarity": 0.25 + 0.02 * i,
        "punsafe": 0.02 * i, "pwatermark": 0.1 * (i % 7), "exif": {"Make": "cam"},
    }  # fmt: skip


def test_expand_braces():
    assert expand_braces("s3://b/{00008..00010}.tar") == [
        "s3://b/00008.tar", "s3://b/00009.tar", "s3://b/00010.tar"]  # fmt: skip
    assert expand_braces("d/{a,b}/{1..2}.tar") == ["d/a/1.tar", "d/a/2.tar", "d/b/1.tar",
                                                   "d/b/2.tar"]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("d/{00000..00002.tar")


def test_img2dataset_layout_round_trip_on_s3(ray_local, s3_server, s3_bucket, tmp_path,
                                             monkeypatch):  # fmt: skip
    monkeypatch.setenv(fs.CACHE_ENV, str(tmp_path / "cache"))
    base = fs.resolve(f"s3://{s3_bucket}/laion")
    truth: dict[str, dict] = {}
    for s in range(3):  # 00002 lies outside the range: not read
        samples, side = [], []
        for j in range(6):
            i = s * 6 + j
            key = f"{s:05d}{j:04d}"
            fields = laion_fields(key, i)
            side.append({**fields, "sidecar_only": f"s{i}"})  # a field only the parquet has
            meta = dict(fields)
            if key == "000010003":
                meta = "not json"
            members = {"jpg": jpg(i), "txt": fields["caption"].encode()}
            members["json"] = (meta if isinstance(meta, str) else json.dumps(meta)).encode()
            samples.append((key, members))
            truth[key] = {**fields, "sidecar_only": f"s{i}"}
        write_shard(base.join(f"{s:05d}.tar"), samples)
        buf = io.BytesIO()
        rows = [{**r, "exif": json.dumps(r["exif"])} for r in side]
        pq.write_table(pa.Table.from_pylist(rows), buf)
        fs.write_bytes_atomic(base.join(f"{s:05d}.parquet"), buf.getvalue())
        fs.write_bytes_atomic(base.join(f"{s:05d}_stats.json"), b"{}")  # img2dataset's, ignored

    torch.manual_seed(0)
    import open_clip

    from trainer.pretrained.clip_models import register_model_config

    register_model_config("tiny_b", TINY_CLIP)
    weights = tmp_path / "clip.safetensors"
    from safetensors.torch import save_file

    model = open_clip.create_model("tiny_b", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"quick_gelu": "false"})  # fmt: skip
    ckpt = base.join("ckpt/clip.safetensors")
    fs.upload_file(str(weights), ckpt)
    (tmp_path / "tiny_b.json").write_text(json.dumps(TINY_CLIP))

    out = fs.resolve(f"s3://{s3_bucket}/clean")
    filters = [{"field": "punsafe", "op": "<", "value": 0.2},
               {"field": "pwatermark", "op": "<", "value": 0.5},
               {"field": "similarity", "op": ">=", "value": 0.27}]  # fmt: skip
    overrides = [
        f"input=s3://{s3_bucket}/laion/{{00000..00001}}.tar", f"output={out.uri}",
        f"filters.fields={json.dumps(filters)}", "clip.model=tiny_b",
        f"clip.model_config={tmp_path / 'tiny_b.json'}", f"clip.checkpoint={ckpt.uri}",
        "clip.threshold=-1", "clip.batch_size=8", "dedup.near=false", "dedup.exact=false", "max_bad_fraction=0.2",
        "decode_batch_size=8",
    ]  # fmt: skip
    cfg = load_config(PreprocessConfig, None, overrides)
    manifest = run_preprocess(cfg, log=lambda *_: None)

    assert manifest["clip_checkpoint_sha256"] == fs.file_digest(str(weights))[1]

    def passes(t):
        return t["punsafe"] < 0.2 and t["pwatermark"] < 0.5 and t["similarity"] >= 0.27

    read = sorted(k for k in truth if k < "00002" and k != "000010003")
    kept = [k for k in read if passes(truth[k])]
    assert 0 < len(kept) < len(read)
    assert manifest["samples"] == len(kept) and manifest["rows_in"] == 12
    assert manifest["reasons"]["invalid_json"] == 1
    assert manifest["reasons"]["field_filter"] == len(read) - len(kept)

    got_keys = []
    for s in range(2):
        tar = fs.read_bytes(out.join(f"shards/shard-{s:05d}.tar"))
        side = pq.read_table(io.BytesIO(fs.read_bytes(out.join(f"shards/shard-{s:05d}.parquet"))))
        side_rows = {r["key"]: r for r in side.to_pylist()}
        for key, m in iter_tar_samples(tar):
            got_keys.append(key)
            meta = json.loads(m["json"])
            want = truth[key]
            for name, value in want.items():  # every input field, unchanged
                expect = json.dumps(value) if name == "exif" else value  # sidecar's spelling
                assert meta[name] in (value, expect), (key, name, meta[name])
            assert meta["source_key"] == key and meta["source_shard"].endswith(f"{s:05d}.tar")
            assert meta["decoded_width"] == 48 and np.isfinite(meta["clip_score"])
            assert side_rows[key]["url"] == want["url"] and side_rows[key]["caption"] == m[
                "txt"].decode()  # fmt: skip
            assert side_rows[key]["punsafe"] == pytest.approx(want["punsafe"])
            assert side_rows[key]["clip_score"] == pytest.approx(meta["clip_score"])
        assert sorted(side_rows) == sorted(k for k in got_keys if k.startswith(f"{s:05d}"))
    assert sorted(got_keys) == kept

    details = {}
    for s in range(2):
        q = pq.read_table(io.BytesIO(fs.read_bytes(out.join(f"quarantine/shard-{s:05d}.parquet"))))
        details.update(zip(q["key"].to_pylist(), q["detail"].to_pylist(), strict=True))
    assert "000010003.json" in details["000010003"]
    for k in read:
        if not passes(truth[k]):  # the detail names the first failing field and its value
            assert " fails " in details[k] and details[k].split("=")[0] in truth[k], details[k]

    # Bad input named: a filter without an op, a range naming a missing shard, a sidecar
    # without keys.
    bad = ['filters.fields=[{"field": "punsafe", "value": 0.1}]']
    with pytest.raises(ConfigError, match=r"filters\.fields\[0\]\.op"):
        check_config(load_config(PreprocessConfig, None, overrides + bad))
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shard\(s\) do not exist.*00003\.tar"):
        list_shards(f"s3://{s3_bucket}/laion/{{00000..00003}}.tar")
    fs.write_bytes_atomic(base.join("00000.parquet"), _parquet_without_key())
    from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows

    with pytest.raises(ValueError, match=r"00000\.parquet: parquet sidecar has no 'key'"):
        read_shard_rows(base.join("00000.tar").uri, ReaderLimits.of())


def _parquet_without_key() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": ["x"]}), buf)
    return buf.getvalue()
