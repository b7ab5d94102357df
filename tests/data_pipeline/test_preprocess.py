"""`t2i preprocess`: hostile input, quarantine, filters, exact dedup, resume-after-kill, S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import load_config
from data_pipeline.preprocess import dedup
from data_pipeline.preprocess.config import PreprocessConfig
from data_pipeline.preprocess.job import PreprocessError, run_preprocess
from data_pipeline.shards import iter_tar_samples
from data_pipeline.writer import SHARD_STATS_DIR
from tests.data_pipeline.preprocess_fixtures import build_clean, build_hostile
from tests.s3_fault_proxy import FaultProxy

QUIET = dict(log=lambda *_: None)

HOSTILE_OVERRIDES = [
    "clip.enabled=false",
    "dedup.near=false",
    "max_bad_fraction=1.0",
    "validate.max_pixels=1000000",
    "validate.max_member_bytes=100000",
    "filters.min_side=24",
    "filters.max_aspect_ratio=3",
    "filters.max_caption_words=20",
    "decode_batch_size=8",
]


def config(inp, out, *overrides) -> PreprocessConfig:
    return load_config(PreprocessConfig, None, [f"input={inp}", f"output={out}", *overrides])


def tar_samples(path: Path) -> list[tuple[str, dict]]:
    return list(iter_tar_samples(path.read_bytes()))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    sentinel = root / "UNPICKLED"
    expected = build_hostile(root / "in", sentinel)
    return root, sentinel, expected


def test_hostile_shards_are_quarantined_per_sample(ray_local, hostile, tmp_path):
    root, sentinel, expected = hostile
    out = tmp_path / "out"
    manifest = run_preprocess(config(root / "in", out, *HOSTILE_OVERRIDES), **QUIET)

    assert manifest["reasons"] == dict(sorted(expected["reasons"].items()))
    rows_in = sum(expected["reasons"].values()) + len(expected["kept"])
    assert manifest["rows_in"] == rows_in and manifest["samples"] == len(expected["kept"])
    assert not sentinel.exists(), "a .pkl member was unpickled"

    # One output shard per input shard (sorted input order); kept samples in key order.
    shards = sorted((out / "shards").glob("*.tar"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.tar" for i in range(4)]
    kept = []
    for p in shards:
        samples = tar_samples(p)
        assert [k for k, _ in samples] == sorted(k for k, _ in samples)
        for key, members in samples:
            meta = json.loads(members["json"])
            assert meta["source_key"] == key and meta["source_shard"].endswith(".tar")
            assert set(members) == {"png", "txt", "json"}  # extra members (.npy) not copied
            kept.append(key)
    assert sorted(kept) == expected["kept"]

    # Quarantine table: one row per bad sample, naming shard, key, reason, detail.
    q = pq.read_table(out / "quarantine").to_pylist()
    assert len(q) == sum(expected["reasons"].values())
    by_key = {r["key"]: r for r in q}
    assert by_key["pickled"]["reason"] == "unsafe_member" and "pkl" in by_key["pickled"]["detail"]
    assert by_key["objnpy"]["reason"] == "unsafe_member"
    assert by_key["zcopy0"]["reason"] == "duplicate_exact" and "good0" in by_key["zcopy0"]["detail"]
    assert by_key["bomb"]["reason"] == "decompression_bomb"
    assert {r["source_shard"].rsplit("/", 1)[1] for r in q if r["reason"] == "corrupt_tar"} == {
        "c.tar",
        "d.tar",
    }

    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["validate"] == {"in": rows_in, "out": rows_in - 16, "dropped": 16}
    assert stats["stages"]["dedup"]["out"] == len(expected["kept"])
    assert (out / "clip_scores.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "_work").exists()
    # A rerun of a finished output does nothing.
    assert run_preprocess(config(root / "in", out, *HOSTILE_OVERRIDES), **QUIET) == manifest


def test_max_bad_fraction_fails_with_a_report(ray_local, hostile, tmp_path):
    root, _, _ = hostile
    cfg = config(
        root / "in" / "c.tar", tmp_path / "out", *HOSTILE_OVERRIDES, "max_bad_fraction=0.1"
    )
    with pytest.raises(PreprocessError) as e:
        run_preprocess(cfg, **QUIET)
    msg = str(e.value)
    assert "1 of 4 samples" in msg and "corrupt_tar=1" in msg and "c.tar" in msg
    assert not (tmp_path / "out" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------
# Resume after a kill: byte-identical to an uninterrupted run
# --------------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def resume_overrides(tmp: Path) -> list[str]:
    cfg_path = tmp / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    return [
        "clip.model=tiny-clip",
        f"clip.model_config={cfg_path}",
        "clip.threshold=0.0",  # random weights: filters some samples, deterministically
        "clip.batch_size=8",
        "decode_batch_size=4",  # several scored parts, so a kill can land between them
        "dedup.near_threshold=0.995",
        "dedup.lsh_bits=4",
    ]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_resume_after_kill_is_byte_identical(ray_local, tmp_path, killed_job):
    build_clean(tmp_path / "in")
    overrides = resume_overrides(tmp_path)
    ref = tmp_path / "ref"
    manifest = run_preprocess(config(tmp_path / "in", ref, *overrides), **QUIET)
    # Shards 1..4 repeat shard 0's first image (those the CLIP filter left in are dropped).
    assert manifest["reasons"].get("duplicate_exact", 0) >= 1
    assert manifest["samples"] > 0

    # The CLI's driver is SIGKILLed once 2 scored parts have landed (no later commit lands),
    # then, rerun, once 2 of the 5 clean shards have.
    out = tmp_path / "resumed"
    args = [f"input={tmp_path / 'in'}", f"output={out}", *overrides]
    killed_job("preprocess", args, "scored", 2)
    assert len(list((out / "_work" / "scored").glob("*.parquet"))) == 2
    stdout = killed_job("preprocess", args, "clean", 2)
    assert "resuming unfinished work" in stdout
    assert len(list((out / SHARD_STATS_DIR).glob("*.json"))) == 2
    assert not (out / "manifest.json").exists()
    logs: list[str] = []
    run_preprocess(config(tmp_path / "in", out, *overrides), log=logs.append)
    text = "\n".join(logs)
    assert "score: all 5 shard(s) already scored" in text and "dedup: already done" in text
    assert "write: 3 shard(s) to commit (2 already done)" in text, text
    assert tree_bytes(out) == tree_bytes(ref)


# --------------------------------------------------------------------------------------------
# S3 in -> S3 out (moto)
# --------------------------------------------------------------------------------------------


def test_s3_in_s3_out(ray_local, s3_bucket, s3_fault_proxy, tmp_path):
    """S3 in, S3 out, every request through a proxy that answers 503, resets connections and
    answers late: the retries complete the job, byte-identical to a fault-free run."""
    import boto3

    build_clean(tmp_path / "in", shards=2, per_shard=6)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])  # moto, no faults
    for p in sorted((tmp_path / "in").glob("*.tar")):
        s3.upload_file(str(p), s3_bucket, f"raw/{p.name}")
    s3.put_object(Bucket=s3_bucket, Key="raw/README.md", Body=b"not a shard")
    inp = f"s3://{s3_bucket}/raw/*.tar"
    ref = tmp_path / "ref"  # fault-free, from the same input URIs (outputs name them)
    run_preprocess(config(inp, ref, "clip.enabled=false"), **QUIET)
    faulty = f"storage.endpoint_url={s3_fault_proxy.url}"
    cfg = config(inp, f"s3://{s3_bucket}/clean", "clip.enabled=false", faulty)
    manifest = run_preprocess(cfg, **QUIET)
    seen = dict(s3_fault_proxy.seen)
    assert min(seen.get(f, 0) for f in ("503", "reset", "delay")) >= 1, seen
    assert manifest["inputs"] == [f"s3://{s3_bucket}/raw/part-{i:03d}.tar" for i in range(2)]
    assert manifest["samples"] == 11 and manifest["reasons"] == {"duplicate_exact": 1}
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="clean/")["Contents"]
    keys = {o["Key"] for o in listed if not o["Key"].endswith("/")}  # not directory markers
    assert {"clean/manifest.json", "clean/stats.json", "clean/clip_scores.png",
            "clean/shards/shard-00000.tar", "clean/quarantine/shard-00001.parquet"} <= keys  # fmt: skip
    assert not any("_work" in k or k.endswith(".tmp") for k in keys)
    got = {k[len("clean/") :]: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys}
    assert got == tree_bytes(ref)
    body = got["shards/shard-00001.tar"]
    assert [k for k, _ in iter_tar_samples(body)] == [f"s1k{j:03d}" for j in range(1, 6)]


def test_storage_settings_reach_the_tasks(ray_local, s3_server, s3_bucket, tmp_path):
    """Issue #16: the plan hands its tasks the job's whole `storage` section, so their S3 clients
    retry as configured, not with the defaults. Every request answered 503 and
    storage.max_attempts=1: each task's client gives up after exactly one request (with the
    default, 10, it would send each request 10 times)."""
    import boto3
    import ray

    from data_pipeline import columns as C
    from data_pipeline.preprocess.job import build_context, write_shard_task
    from data_pipeline.resumable import read_shard_task

    build_clean(tmp_path / "in", shards=1, per_shard=2)
    boto3.client("s3").upload_file(str(tmp_path / "in/part-000.tar"), s3_bucket, "raw/a.tar")
    fault = ["ok"]
    with FaultProxy(s3_server, lambda n: fault[0]) as proxy:
        cfg = config(f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/out", "clip.enabled=false",
                     f"storage.endpoint_url={proxy.url}", "storage.max_attempts=1")  # fmt: skip
        ctx = build_context(cfg, **QUIET)  # lists the input through the proxy, fault-free
        fault[0] = "503"
        # The read phase's task, run by Ray Data with the plan's own arguments.
        item = {C.SHARD_IDX: 0, C.SOURCE_SHARD: ctx.shards[0], "skip": "[]"}
        fn_kwargs = {"limits": ctx.limits, **ctx.storage}
        rows = ray.data.from_items([item]).flat_map(read_shard_task, fn_kwargs=fn_kwargs)
        # A storage error is the job's failure, naming the shard, never a `corrupt_tar` verdict
        # (that would drop a whole shard for a transient outage).
        with pytest.raises(Exception, match=r"a\.tar: cannot open the shard"):
            rows.take_all()
        assert proxy.seen["503"] == 1, dict(proxy.seen)
        # The write phase's task: its first read (the dedup verdicts) fails on the first 503.
        with pytest.raises(OSError):
            write_shard_task({C.SHARD_IDX: 0, "parts": "[]"}, out_uri=ctx.out.uri,
                             shards=ctx.shards, limits=ctx.limits, **ctx.storage)  # fmt: skip
        assert proxy.seen["503"] == 2, dict(proxy.seen)


def test_a_storage_error_mid_shard_stops_the_job_instead_of_quarantining(tmp_path, monkeypatch):
    """The tar reader quarantines a damaged stream as `corrupt_tar`; a storage error under it
    (the stream's read failing after the client's retries) must not read as damage, or a
    transient outage would drop the rest of the shard: it is an error naming the shard."""
    from data_pipeline import columns as C
    from data_pipeline import fs
    from data_pipeline.webdataset_source import ReaderLimits, StorageReadError, read_shard_rows

    build_clean(tmp_path / "in", shards=1, per_shard=6)
    shard = str(tmp_path / "in" / "part-000.tar")
    assert all(not r[C.REASON] for r in read_shard_rows(shard, ReaderLimits.of()))

    class Breaks:  # serves the first 20 KB of a shard, then the storage fails
        def __init__(self, stream):
            self.stream, self.left = stream, 20_000

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def read(self, n=-1):
            if self.left <= 0:
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")
            data = self.stream.read(min(n, self.left) if n >= 0 else self.left)
            self.left -= len(data)
            return data

    class FlakyFs:
        def __init__(self, real):
            self.real = real

        def open_input_stream(self, path):
            return Breaks(self.real.open_input_stream(path))

    resolve = fs.resolve

    def flaky(uri, **kw):
        loc = resolve(uri, **kw)
        return fs.Location(FlakyFs(loc.fs), loc.path, loc.uri)

    monkeypatch.setattr(fs, "resolve", flaky)
    with pytest.raises(StorageReadError, match=r"part-000\.tar: storage error while reading"):
        read_shard_rows(shard, ReaderLimits.of())


# --------------------------------------------------------------------------------------------
# Dedup building blocks
# --------------------------------------------------------------------------------------------


def test_lsh_codes_group_near_vectors_and_split_far_ones():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base + 0.03 * rng.standard_normal(base.shape).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    planes = dedup.lsh_hyperplanes(64, bands=8, bits=10, seed=0)
    a, b = dedup.compute_lsh_codes(base, planes), dedup.compute_lsh_codes(near, planes)
    assert np.array_equal(a, dedup.compute_lsh_codes(base, planes))  # deterministic
    assert (a == b).any(axis=1).mean() > 0.95  # near pairs share a bucket in some band
    far = (a[:100] == a[100:]).any(axis=1).mean()
    assert far < 0.1  # unrelated pairs rarely meet


def test_dedup_resolution_is_deterministic_and_keeps_smallest_key():
    def edge(a, b, cos, kind="near"):
        return {"a_key": a, "a_source_shard": "s.tar", "a_seq": ord(a), "a_shard_idx": 0,
                "b_key": b, "b_source_shard": "s.tar", "b_seq": ord(b), "b_shard_idx": 0,
                "cosine": cos, "kind": kind}  # fmt: skip

    # Chain a~b~c (a, c not similar): b goes (a kept), c stays (its only neighbour was dropped).
    edges = [edge("b", "c", 0.97), edge("a", "b", 0.98), edge("a", "b", 0.98)]
    drops = dedup.resolve_edges(edges)
    assert [(d["seq"], d["reason"]) for d in drops] == [(ord("b"), "duplicate_near")]
    assert dedup.resolve_edges(edges[::-1]) == drops
    # An exact duplicate leaves the near graph first: d == a exactly, so d goes as exact and
    # does not shield anything; b still goes as near.
    edges += [edge("a", "d", 1.0, "exact"), edge("b", "d", 0.99)]
    drops = dedup.resolve_edges(edges)
    assert [(chr(d["seq"]), d["reason"]) for d in drops] == [
        ("b", "duplicate_near"),
        ("d", "duplicate_exact"),
    ]


def test_pairs_in_bucket_compare_exactly():
    emb = np.array([[1, 0], [0.999, 0.045], [0, 1]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    batch = {
        "key": np.array(["b", "a", "c"]), "source_shard": np.array(["s"] * 3),
        "shard_idx": np.zeros(3, np.int64), "seq": np.arange(3), "embedding": emb,
        "bucket": np.array(["0:5"] * 3),
    }  # fmt: skip
    pairs = dedup.pairs_in_bucket(batch, 0.99, chunk=1)
    assert list(pairs["a_key"]) == ["a"] and list(pairs["b_key"]) == ["b"]
    assert list(pairs["kind"]) == ["near"]
    batch["bucket"] = np.array(["x:abc"] * 3)
    pairs = dedup.pairs_in_bucket(batch, 0.99)
    assert list(pairs["a_key"]) == ["a", "a"] and list(pairs["b_key"]) == ["b", "c"]


def test_cli_reports_config_errors_without_starting_ray(capsys):
    from jobs.cli import main

    assert main(["preprocess", "output=/tmp/x", "clip.treshold=0.3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'clip.treshold'" in err
    assert main(["preprocess", "input=a"]) == 2
    assert "missing required value 'output'" in capsys.readouterr().err


def test_listing_dirs_globs_and_lists(hostile):
    from data_pipeline.webdataset_source import list_shards

    root, _, _ = hostile
    inp = root / "in"
    names = ["a.tar", "b.tar", "c.tar", "d.tar"]
    assert [Path(p).name for p in list_shards(str(inp))] == names
    assert [Path(p).name for p in list_shards(f"{inp}/[ab].tar")] == ["a.tar", "b.tar"]
    assert [Path(p).name for p in list_shards([str(inp / "d.tar"), f"{inp}/*.tar"])] == names
    with pytest.raises(FileNotFoundError, match="matches no .tar shard"):
        list_shards(f"{inp}/*.tgz")
