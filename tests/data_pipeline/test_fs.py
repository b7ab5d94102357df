import os

import pytest

from data_pipeline import fs
from data_pipeline.manifest import ManifestError, read_manifest, write_manifest


def test_resolve_local_and_file_uri(tmp_path):
    loc = fs.resolve(str(tmp_path / "a"))
    assert not loc.is_s3 and loc.path == str(tmp_path / "a")
    assert fs.resolve(f"file://{tmp_path}").path == str(tmp_path)
    assert fs.resolve("rel/dir").path == os.path.abspath("rel/dir")
    with pytest.raises(ValueError, match="unsupported path scheme 'gs'"):
        fs.resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        fs.resolve("s3:///x")


def test_s3_endpoint_from_config_or_environment(s3_server, s3_bucket, monkeypatch):
    """The endpoint comes from config when given, else from AWS_ENDPOINT_URL."""
    loc = fs.resolve(f"s3://{s3_bucket}/prefix/")
    assert loc.is_s3 and loc.path == f"{s3_bucket}/prefix" and loc.uri == f"s3://{s3_bucket}/prefix"
    fs.write_bytes_atomic(loc.join("a.txt"), b"via env")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    loc = fs.resolve(f"s3://{s3_bucket}/prefix", endpoint_url=s3_server, region="us-east-1")
    assert fs.read_bytes(loc.join("a.txt")) == b"via env"
    with pytest.raises(ValueError, match="S3 endpoint must look like"):
        fs.resolve("s3://b/p", endpoint_url="minio:9000")


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    loc = fs.resolve(str(tmp_path / "out.bin"))
    with pytest.raises(RuntimeError):
        with fs.open_output_atomic(loc) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []
    fs.write_bytes_atomic(loc, b"whole")
    assert fs.read_bytes(loc) == b"whole" and os.listdir(tmp_path) == ["out.bin"]


def test_s3_atomic_write_and_abort(s3_bucket):
    base = fs.resolve(f"s3://{s3_bucket}/x")
    with pytest.raises(RuntimeError):
        with fs.open_output_atomic(base.join("broken.bin")) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-upload")
    assert not fs.exists(base.join("broken.bin"))
    fs.write_bytes_atomic(base.join("ok.bin"), b"data")
    assert fs.read_bytes(base.join("ok.bin")) == b"data"
    assert fs.list_files(base) == [f"{s3_bucket}/x/ok.bin"]


def test_manifest_versions(tmp_path):
    base = fs.resolve(str(tmp_path))
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(base, "fmt", (1,))
    write_manifest(base, "fmt", 2, {"rows": 3})
    assert read_manifest(base, "fmt", (1, 2))["rows"] == 3
    with pytest.raises(ManifestError, match="version 2 is not one this release reads"):
        read_manifest(base, "fmt", (1,))
    with pytest.raises(ManifestError, match="format is 'fmt', expected 'other'"):
        read_manifest(base, "other", (2,))
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(base, "fmt", (2,))
