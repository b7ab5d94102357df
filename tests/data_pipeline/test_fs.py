import hashlib
import os
import pickle
from dataclasses import asdict, fields

import numpy as np
import pytest

from data_pipeline import fs
from data_pipeline.config import StorageConfig
from data_pipeline.manifest import ManifestError, read_manifest, write_manifest
from tests.s3_fault_proxy import FaultProxy, combine, every


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


def test_s3_options_from_config_survive_pickling():
    """StorageConfig's retry/timeout fields reach the client, also after Ray pickles it."""
    defaults = fs.S3Options()
    assert {f.name: getattr(StorageConfig(), f.name) for f in fields(fs.S3Options)} == asdict(
        defaults
    )
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=4, request_timeout_s=7.0)
    loc = fs.resolve("s3://b/p", storage=cfg)
    back = pickle.loads(pickle.dumps(loc.fs))
    assert isinstance(back, fs.S3FileSystem) and back.options == fs.S3Options(
        max_attempts=4, request_timeout_s=7.0
    )
    assert fs._client_settings(back) == ("http://127.0.0.1:9", "us-east-1", back.options)
    with pytest.raises(ValueError, match="max_attempts must be >= 1"):
        fs.resolve("s3://b/p", storage=StorageConfig(max_attempts=0))


def test_part_plan_has_no_5gib_ceiling():
    """A 49 GB export (the 12B preset in fp32) fits S3's 10,000 parts; 1 TiB gets bigger parts."""
    mib = 1 << 20
    assert fs.plan_part_size(49 * 10**9, 64 * mib) == 64 * mib  # 731 parts
    big = fs.plan_part_size(1 << 40, 64 * mib)
    assert -(-(1 << 40) // big) <= fs.MAX_PARTS and big % mib == 0
    assert fs.plan_part_size(100, 1) == fs.MIN_PART_BYTES
    with pytest.raises(ValueError, match="object size limit"):
        fs.plan_part_size(60 << 40, 64 * mib)


# Of every 11 requests one gets a 503 and one a reset connection; every 13th answer comes late.
FAULTS = combine(every(11, 1, "503"), every(11, 6, "reset"), every(13, 3, "delay"))


def test_s3_through_faults_is_byte_identical(s3_server, s3_bucket, tmp_path):
    """Reads, listings, small writes and multipart uploads complete through 503s, resets and
    slow answers with the exact bytes (compared with a fault-free client's view)."""
    rng = np.random.default_rng(0)
    small = rng.bytes(3000)
    big = rng.bytes(6 << 20)  # 2 parts of 5 MiB
    (tmp_path / "big.bin").write_bytes(big)
    opts = StorageConfig(max_attempts=6)
    with FaultProxy(s3_server, FAULTS, delay_s=0.5) as proxy:
        base = fs.resolve(f"s3://{s3_bucket}/faulty", endpoint_url=proxy.url, storage=opts)
        for i in range(4):
            fs.write_bytes_atomic(base.join(f"small{i}.bin"), small[i:])
        fs.upload_file(str(tmp_path / "big.bin"), base.join("big.bin"), part_bytes=5 << 20)
        fs.upload_file(str(tmp_path / "big.bin"), base.join("one.bin"), part_bytes=16 << 20)
        listed = fs.list_files(base)
        got = {p.rsplit("/", 1)[1]: fs.read_bytes(fs.Location(base.fs, p, p)) for p in listed}
    assert min(proxy.seen["503"], proxy.seen["reset"], proxy.seen["delay"]) >= 3
    direct = fs.resolve(f"s3://{s3_bucket}/faulty")  # fault-free, straight to moto
    assert fs.list_files(direct) == listed
    want = {f"small{i}.bin": small[i:] for i in range(4)} | {"big.bin": big, "one.bin": big}
    assert got == want
    assert {
        p.rsplit("/", 1)[1]: fs.read_bytes(fs.Location(direct.fs, p, p)) for p in listed
    } == want


def test_s3_without_retries_fails_on_a_fault(s3_server, s3_bucket):
    """The control: with max_attempts=1 the same proxy's first 503 is an error."""
    with FaultProxy(s3_server, combine(every(1, 0, "503"))) as proxy:
        base = fs.resolve(
            f"s3://{s3_bucket}/x", endpoint_url=proxy.url, storage=StorageConfig(max_attempts=1)
        )
        with pytest.raises(OSError):
            fs.write_bytes_atomic(base.join("a.bin"), b"data")
    assert proxy.seen["503"] >= 1 and proxy.seen["ok"] == 0


def test_reads_survive_bodies_cut_mid_stream(s3_server, s3_bucket, tmp_path, monkeypatch):
    """A GET whose body breaks off mid-stream: the S3 client retries it (through the proxy); an
    error that surfaces from the stream anyway (a drill once saw "Failed to flush response
    stream" from GetObject) makes our reads start again from the first byte, and a download's
    file and digest hold only the complete read. The control: with one attempt it fails."""
    data = np.random.default_rng(1).bytes(9 << 20)
    key = f"s3://{s3_bucket}/cut/a.bin"
    fs.write_bytes_atomic(fs.resolve(key), data)
    with FaultProxy(s3_server, combine(every(2, 1, "cut"))) as proxy:
        assert fs.read_bytes(fs.resolve(key, endpoint_url=proxy.url)) == data
    assert proxy.seen["cut"] >= 1

    class BreaksOnce:  # the first stream opened raises after its first chunk
        def __init__(self, real):
            self.real, self.broken = real, False

        def open_input_stream(self, path):
            stream = self.real.open_input_stream(path)
            if self.broken:
                return stream
            self.broken = True
            return CutStream(stream)

    class CutStream:
        def __init__(self, stream):
            self.stream, self.reads = stream, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def read(self, n):
            self.reads += 1
            if self.reads == 1:
                return self.stream.read(n)
            raise OSError("AWS Error INTERNAL_FAILURE during GetObject operation")

    loc = fs.resolve(key)
    flaky = fs.Location(BreaksOnce(loc.fs), loc.path, loc.uri)
    assert fs.read_bytes(flaky) == data
    flaky = fs.Location(BreaksOnce(loc.fs), loc.path, loc.uri)
    assert fs.download_file(flaky, str(tmp_path / "a.bin")) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "a.bin").read_bytes() == data
    monkeypatch.setattr(fs, "STREAM_ATTEMPTS", 1)
    with pytest.raises(OSError, match="INTERNAL_FAILURE"):
        fs.read_bytes(fs.Location(BreaksOnce(loc.fs), loc.path, loc.uri))
