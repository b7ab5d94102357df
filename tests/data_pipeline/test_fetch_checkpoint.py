"""`fs.fetch_checkpoint`: s3:// checkpoint files and directories fetched once per node into a
cache keyed by URI + ETag/size, with the sha256 that manifests record; local paths in place."""

import hashlib
import os
import threading

import boto3
import pytest

from data_pipeline import fs


def _put(endpoint, bucket, key, data):
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=data)


def test_fetch_checkpoint_s3_file_and_dir_once_per_node(
    s3_server, s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv(fs.CACHE_ENV, str(tmp_path / "cache"))
    _put(s3_server, s3_bucket, "ckpt/clip.pt", b"weights-v1")
    _put(s3_server, s3_bucket, "sd/unet/config.json", b"{}")
    _put(s3_server, s3_bucket, "sd/model_index.json", b'{"a": 1}')

    calls = []
    real = fs.download_file

    def counting(loc, dst):
        calls.append(loc.uri)
        return real(loc, dst)

    monkeypatch.setattr(fs, "download_file", counting)
    # Four concurrent callers (actors of one pool on one node): one download.
    out: list = []
    uri = f"s3://{s3_bucket}/ckpt/clip.pt"
    threads = [
        threading.Thread(target=lambda: out.append(fs.fetch_checkpoint(uri))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [uri]
    assert len({c.path for c in out}) == 1
    got = out[0]
    assert open(got.path, "rb").read() == b"weights-v1" and not got.is_dir
    assert got.sha256 == hashlib.sha256(b"weights-v1").hexdigest()
    assert os.path.basename(got.path) == "clip.pt"

    # A changed object (new ETag/size) is fetched again, under a new entry.
    _put(s3_server, s3_bucket, "ckpt/clip.pt", b"weights-v2!")
    again = fs.fetch_checkpoint(uri)
    assert again.path != got.path and open(again.path, "rb").read() == b"weights-v2!"
    assert len(calls) == 2

    # A directory (a pipeline folder): every file, digest = tree digest, same as a local copy.
    d = fs.fetch_checkpoint(f"s3://{s3_bucket}/sd/")
    assert d.is_dir and sorted(os.listdir(d.path)) == ["model_index.json", "unet"]
    assert open(os.path.join(d.path, "unet/config.json"), "rb").read() == b"{}"
    local = fs.fetch_checkpoint(d.path)
    assert local.path == d.path and local.sha256 == d.sha256 and local.is_dir
    assert fs.fetch_checkpoint(f"s3://{s3_bucket}/sd").path == d.path  # no trailing slash
    assert len(calls) == 4  # two files, once

    with pytest.raises(FileNotFoundError, match=r"clip\.checkpoint: no such file or directory"):
        fs.fetch_checkpoint(f"s3://{s3_bucket}/nope.pt", what="clip.checkpoint")
    with pytest.raises(FileNotFoundError, match="text_encoder.checkpoint"):
        fs.fetch_checkpoint(str(tmp_path / "missing.pt"), what="text_encoder.checkpoint")
    # Nothing temporary is left in the cache.
    assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".tmp")]
