"""Checkpoint directories: complete ones are found newest-first; anything else is ignored."""

import os

import pytest

from data_pipeline import fs
from trainer import checkpoint as ck


def make_ckpt(run: fs.Location, step: int, tmp_path, *, manifest=True, files=None):
    local = tmp_path / f"stage{step}"
    for rel, data in (
        files
        or {
            "ds/state/mp_rank_00_model_states.pt": b"m" * 10,
            "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"0",
            "ds/state/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"1",
            "train_state.json": b"{}",
        }
    ).items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    dest = run.join("checkpoints", ck.step_dir_name(step))
    entries = ck.upload_dir(str(local), dest)
    if manifest:
        ck.write_manifest(dest, step, entries)
    return dest


@pytest.mark.parametrize("where", ["local", "s3"])
def test_latest_complete_skips_incomplete_and_corrupt(where, tmp_path, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        run = fs.resolve(f"s3://{bucket}/runs/r1")
    else:
        run = fs.resolve(str(tmp_path / "runs" / "r1"))
    assert ck.list_complete(run) == []
    make_ckpt(run, 10, tmp_path)
    make_ckpt(run, 20, tmp_path)
    make_ckpt(run, 30, tmp_path, manifest=False)  # crashed before the manifest: not a checkpoint
    assert [s for s, _ in ck.list_complete(run)] == [20, 10]

    # A file truncated after the manifest was written: incomplete, skipped.
    bad = make_ckpt(run, 40, tmp_path)
    fs.write_bytes_atomic(bad.join("train_state.json"), b"{")
    assert [s for s, _ in ck.list_complete(run)] == [20, 10]

    # Same size, different bytes: found complete by size, but download verifies sha256.
    tampered = make_ckpt(run, 50, tmp_path)
    fs.write_bytes_atomic(tampered.join("ds/state/mp_rank_00_model_states.pt"), b"x" * 10)
    assert ck.list_complete(run)[0][0] == 50
    with pytest.raises(ValueError, match="sha256 does not match"):
        ck.download(tampered, str(tmp_path / "dl50"))

    local = tmp_path / "dl20"
    doc = ck.download(ck.list_complete(run)[1][1], str(local), rank=1)
    assert doc["step"] == 20
    got = sorted(ck.local_files(str(local)))
    assert "ds/state/zero_pp_rank_1_mp_rank_00_optim_states.pt" in got
    assert "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt" not in got  # other rank's shard


def test_prune_keeps_newest(tmp_path):
    run = fs.resolve(str(tmp_path / "r"))
    for step in (1, 2, 3, 4):
        make_ckpt(run, step, tmp_path)
    make_ckpt(run, 0, tmp_path, manifest=False)
    ck.prune(run, keep=2)
    assert [s for s, _ in ck.list_complete(run)] == [4, 3]
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["step_00000003", "step_00000004"]


# A checkpoint writer that stops (touches the barrier, then sleeps) after `stop_after` parts of a
# multipart upload: the test SIGKILLs it there, a deterministic point mid-upload.
WRITER = """
import pathlib, sys, time
from data_pipeline import fs
from trainer import checkpoint as ck
local, uri, barrier, stop_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def on_part(rel, done, total):
    if done == stop_after:
        pathlib.Path(barrier).write_text(f"{rel} {done}/{total}")
        time.sleep(600)
dest = fs.resolve(uri)
ck.write_manifest(dest, 20, ck.upload_dir(local, dest, part_bytes=5 << 20, on_part=on_part))
"""


def test_killed_multipart_writer_leaves_nothing_complete(s3_bucket, tmp_path):
    """SIGKILL mid-way through a multipart upload of a checkpoint's weights: no object under the
    final key, no manifest, and the previous checkpoint is still the newest complete one."""
    import signal
    import subprocess
    import sys
    import time

    import boto3
    import numpy as np

    run = fs.resolve(f"s3://{s3_bucket}/runs/big")
    make_ckpt(run, 10, tmp_path)
    big = np.random.default_rng(0).bytes(12 << 20)  # 3 parts of 5 MiB (the last smaller)
    files = {"train_state.json": b"{}", "model.safetensors": big}
    local = tmp_path / "stage20"
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    barrier = tmp_path / "barrier"
    dest_uri = f"{run.uri}/checkpoints/{ck.step_dir_name(20)}"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(local), dest_uri, str(barrier), "2"], cwd=repo
    )
    deadline = time.monotonic() + 120
    while not barrier.exists():
        assert proc.poll() is None, "writer exited before the kill point"
        assert time.monotonic() < deadline, "writer never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert barrier.read_text() == "model.safetensors 2/3"

    s3 = boto3.client("s3")
    key = f"runs/big/checkpoints/{ck.step_dir_name(20)}/model.safetensors"
    pending = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in pending] == [key]  # parts were uploaded, never completed
    dest = run.join("checkpoints", ck.step_dir_name(20))
    assert not fs.exists(dest.join("model.safetensors"))
    assert not fs.exists(dest.join("manifest.json"))
    assert [s for s, _ in ck.list_complete(run)] == [10]

    # Rerun to the end: the same key now holds every byte, and the checkpoint is complete.
    s3.abort_multipart_upload(Bucket=s3_bucket, Key=key, UploadId=pending[0]["UploadId"])
    ck.write_manifest(dest, 20, ck.upload_dir(str(local), dest, part_bytes=5 << 20))
    assert fs.read_bytes(dest.join("model.safetensors")) == big
    assert [s for s, _ in ck.list_complete(run)] == [20, 10]


def test_failed_multipart_upload_is_aborted(s3_bucket, tmp_path):
    """An error mid-upload (in-process) aborts it: no object, no parts left behind."""
    import boto3

    (tmp_path / "w.bin").write_bytes(b"w" * (11 << 20))
    loc = fs.resolve(f"s3://{s3_bucket}/x/w.bin")

    def fail(done, total):
        if done == 2:
            raise RuntimeError("network gone")

    with pytest.raises(RuntimeError, match="network gone"):
        fs.upload_file(str(tmp_path / "w.bin"), loc, part_bytes=5 << 20, on_part=fail)
    assert not fs.exists(loc)
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
