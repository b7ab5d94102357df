"""Checkpoint directories: complete ones are found newest-first; anything else is ignored."""

import io
import os

import pytest
import torch

from data_pipeline import fs
from trainer import checkpoint as ck
from trainer import safe_files as sf


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def make_ckpt(run: fs.Location, step: int, tmp_path, *, manifest=True, files=None):
    local = tmp_path / f"stage{step}"
    for rel, data in (
        files
        or {
            "ds/state/mp_rank_00_model_states.pt": pt_bytes({"module": {"w": torch.ones(3)}}),
            "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": pt_bytes({"r": torch.zeros(1)}),
            "ds/state/zero_pp_rank_1_mp_rank_00_optim_states.pt": pt_bytes({"r": torch.ones(1)}),
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
    target = tampered.join("ds/state/mp_rank_00_model_states.pt")
    data = bytearray(fs.read_bytes(target))
    data[-40] ^= 0xFF  # one bit pattern flipped, size unchanged
    fs.write_bytes_atomic(target, bytes(data))
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


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def test_planted_pickle_payload_is_refused(tmp_path):
    """A pickle payload in the optimizer file, WITH a matching sha256 manifest (as anyone who can
    write the bucket could plant): download refuses it by name, resume's rank-0 choice falls back
    to the previous checkpoint, and the payload never runs. A weights_only=False load (what
    DeepSpeed 0.19 does) would run it."""

    marker = tmp_path / "marker"
    run = fs.resolve(str(tmp_path / "runs" / "r"))
    make_ckpt(run, 10, tmp_path)
    optim = "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    planted = pt_bytes({"optimizer_state_dict": {"state": Payload(str(marker))}})
    files = {
        "ds/state/mp_rank_00_model_states.pt": pt_bytes({"module": {"w": torch.ones(3)}}),
        optim: planted,
        "train_state.json": b"{}",
    }
    bad = make_ckpt(run, 20, tmp_path, files=files)
    assert [s for s, _ in ck.list_complete(run)] == [20, 10]  # the manifest matches

    with pytest.raises(sf.UnsafeCheckpointError, match=f"{optim}: refusing to load"):
        ck.download(bad, str(tmp_path / "dl"), rank=0)
    local = tmp_path / "resume"
    local.mkdir()
    assert ck.pick_checkpoint(run, str(local)) == 10
    assert not marker.exists()

    torch.load(io.BytesIO(planted), weights_only=False)  # the control: the payload is live
    assert marker.read_text() == "payload ran"


# Saves a tiny real DeepSpeed checkpoint per ZeRO stage / precision into argv[1] (one process,
# world size 1, gloo): the state our allow-list must accept.
DS_SAVER = """
import os, sys, torch, torch.nn as nn, torch.distributed as dist
import deepspeed
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
for stage, prec in [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if prec == "bf16":
        ds["bf16"] = {"enabled": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    loss = eng(torch.randn(2, 4, dtype=dtype)).float().pow(2).mean()
    eng.backward(loss)
    eng.step()
    eng.save_checkpoint(os.path.join(sys.argv[1], f"z{stage}_{prec}"), tag="state")
    # What the run would export, and the working weights it trains with, for the export test.
    from safetensors.torch import save_file
    from trainer.engine import export_module_state
    from deepspeed.runtime.zero import GatheredParameters
    exported = export_module_state(eng)
    with GatheredParameters(list(eng.module.parameters())):
        working = {k: v.float().clone() for k, v in eng.module.state_dict().items()}
    save_file(exported, os.path.join(sys.argv[1], f"export_z{stage}_{prec}.safetensors"))
    save_file(working, os.path.join(sys.argv[1], f"working_z{stage}_{prec}.safetensors"))
"""


@pytest.mark.slow
def test_real_deepspeed_state_passes_the_weights_only_check(tmp_path):
    """Real DeepSpeed 0.19 ZeRO-0/1/2/3 state (fp32, bf16) loads under the allow-list, and the
    allow-list is needed: plain weights_only=True refuses the ZeRO optimizer files. The same
    engines' exports are their fp32 master weights."""
    import subprocess
    import sys

    from tests.conftest import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    subprocess.run(
        [sys.executable, "-c", DS_SAVER, str(tmp_path), str(free_port())], check=True, env=env
    )
    pts = sorted(str(p) for p in tmp_path.rglob("*.pt"))
    assert len(pts) == 7  # stage 0: one file; stages 1-3: model + optimizer
    for p in pts:
        sf.check_weights_only(p, p)
    refused = []
    for p in pts:
        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            refused.append(os.path.basename(os.path.dirname(os.path.dirname(p))))
    assert sorted(refused) == ["z1_bf16", "z2_fp32", "z3_bf16"]

    # The export is fp32 master weights: for fp32 runs the weights themselves; for bf16 runs
    # within bf16 rounding of the working copy but not that copy cast up (after an AdamW step
    # of ~1e-3 the masters sit between bf16 values).
    from safetensors.torch import load_file

    for run in ("z0_fp32", "z1_bf16", "z2_fp32", "z3_bf16"):
        exported = load_file(str(tmp_path / f"export_{run}.safetensors"))
        working = load_file(str(tmp_path / f"working_{run}.safetensors"))
        assert exported.keys() == working.keys() and all(
            v.dtype == torch.float32 for v in exported.values()
        )
        for k, w in working.items():
            if run.endswith("fp32") or w.dim() == 0:
                assert torch.equal(exported[k], w), (run, k)
                continue
            m = exported[k]
            assert torch.equal(m.bfloat16().float(), w), (run, k)  # rounds to the working copy
            assert not torch.equal(m, w), (run, k)  # but is not it: bits below bf16's 8 kept


def test_safetensors_bytes_are_deterministic(tmp_path):
    """Same weights and metadata -> same bytes, in any save; safetensors' own save varies."""
    from safetensors.torch import load, load_file, save

    weights = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2).bfloat16()}
    meta = {"objective": "dalle", "step": "100", "source": "test", "format": "pt"}
    assert len({save(weights, metadata=meta) for _ in range(20)}) > 1  # the problem
    ours = {sf.safetensors_bytes(weights, meta) for _ in range(20)}
    assert len(ours) == 1
    sf.save_safetensors(weights, str(tmp_path / "m.safetensors"), meta)
    assert (tmp_path / "m.safetensors").read_bytes() in ours
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], weights[k]) and back[k].dtype == weights[k].dtype for k in back)
    assert load(sf.safetensors_bytes(weights)).keys() == weights.keys()  # no metadata


def test_a_damaged_torch_file_is_unreadable_not_a_crash(tmp_path):
    """Truncated or garbled DeepSpeed state raises ValueError (resume skips such a checkpoint)."""
    import io

    import torch

    from trainer.safe_files import check_weights_only

    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    for i, data in enumerate([buf.getvalue()[:40], b"\x80\x02}q\x00(X", bytes(range(256)) * 4]):
        path = tmp_path / f"bad{i}.pt"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"bad{i}.pt"):
            check_weights_only(str(path), str(path))
