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
