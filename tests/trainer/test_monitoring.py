"""Monitoring: what a running job exports is read back where Ray users look.

- Training and preprocessing metrics (`ray.util.metrics`) are scraped from each node's metrics
  export port — the Prometheus endpoint behind the Ray dashboard's Metrics view — during a run.
- TensorBoard events, metrics.jsonl and the loss curve live in the run's own directory in its
  storage (S3 here), uploaded with the checkpoints.
"""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline import fs
from data_pipeline.config import load_config
from data_pipeline.preprocess.config import PreprocessConfig
from data_pipeline.ray_metrics import PROMETHEUS_PREFIX, TRAIN
from trainer.config import TrainConfig
from trainer.metrics import plot_loss_curve, read_metrics_rows, upload_changed

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "dalle_tiny.yaml"


def scrape(ray) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every `ray_t2i_*` sample on every live node's metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue  # the agent is (re)starting; the next poll retries
        # The page holds all of Ray's own metrics too (~300 kB): parse only our samples' lines.
        ours = "\n".join(
            line for line in text.splitlines() if line.startswith(PROMETHEUS_PREFIX + "t2i_")
        )
        for family in text_string_to_metric_families(ours + "\n"):
            for s in family.samples:
                if s.name.startswith(PROMETHEUS_PREFIX + "t2i_"):
                    out.append((s.name, dict(s.labels), float(s.value)))
    return out


def poll(ray, wanted: set[str], labels: dict[str, str], until, grace_s: float = 30.0) -> dict:
    """Scrape every 2 s (leaving the cores to the run) until each of `wanted` (Prometheus names) has a sample carrying
    `labels`, and `until()` is true, or `grace_s` after `until()` first held. Returns
    {name: [values seen, in order]}."""
    seen: dict[str, list[float]] = {}
    done_at = None
    while True:
        for name, lab, value in scrape(ray):
            if name in wanted and all(lab.get(k) == v for k, v in labels.items()):
                if not seen.get(name) or seen[name][-1] != value:
                    seen.setdefault(name, []).append(value)
        if until():
            done_at = done_at or time.monotonic()
            if wanted <= seen.keys() or time.monotonic() - done_at > grace_s:
                return seen
        time.sleep(2.0)


@pytest.mark.slow
def test_training_metrics_reach_the_dashboard_and_tensorboard_is_stored_on_s3(ray_local, s3_bucket):
    from trainer.launch import fit

    name = f"mon-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{s3_bucket}/runs"
    cfg = load_config(
        TrainConfig,
        TINY,
        [
            f"name={name}",
            f"checkpoint.storage_path={storage}",
            "failure_max_retries=0",
            "steps=4",
            "log_every=2",
            "checkpoint.every_steps=2",  # checkpoints at 2 and 4 (the end)
            "scaling.num_workers=1",  # rank 0 exports; one worker starts faster
        ],
    )
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=fit(cfg)), daemon=True)
    worker.start()
    wanted = {PROMETHEUS_PREFIX + m for m in TRAIN}
    seen = poll(ray_local, wanted, {"run": name, "objective": "dalle"}, lambda: "result" in box)
    worker.join()
    assert box["result"].error is None, box["result"].error
    assert wanted <= seen.keys(), f"never exported: {sorted(wanted - seen.keys())}"

    run = fs.resolve(storage).join(name)
    rows = [json.loads(line) for line in fs.read_bytes(run.join("tensorboard", "metrics.jsonl"))
            .decode().splitlines()]  # fmt: skip
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["step_time_s"] > 0 for r in rows)
    # Step 2's checkpoint is saved after its row: its seconds are in the next row.
    assert "checkpoint_s" not in rows[0] and rows[1]["checkpoint_s"] > 0
    # What the dashboard showed are the logged values themselves, not look-alikes.
    p = PROMETHEUS_PREFIX
    assert set(seen[p + "t2i_train_loss"]) <= {r["loss"] for r in rows}, seen
    assert set(seen[p + "t2i_train_step"]) <= {2.0, 4.0}
    assert all(v > 0 for v in seen[p + "t2i_train_checkpoint_seconds"])
    assert all(0 < v < 1 for v in seen[p + "t2i_train_mfu"])
    tok = {r["tokens_per_s"] for r in rows}
    assert set(seen[p + "t2i_train_tokens_per_s"]) <= tok

    # TensorBoard files and the loss curve are in the run's own directory on S3.
    names = [Path(f).name for f in fs.list_files(run.join("tensorboard"))]
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert events and "loss_curve.png" in names, names
    png = Image.open(io.BytesIO(fs.read_bytes(run.join("tensorboard", "loss_curve.png"))))
    assert png.format == "PNG" and png.size[0] > 100
    # TensorBoard reads the run straight from S3 (its boto3 filesystem; what
    # `tensorboard --logdir s3://.../<name>/tensorboard` does).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{run.uri}/tensorboard")
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("train/checkpoint_s")] == [2, 4]


@pytest.mark.slow
def test_preprocess_exports_rows_and_quarantine_counts(ray_local, tmp_path):
    from data_pipeline.preprocess.job import run_preprocess
    from tests.data_pipeline.preprocess_fixtures import build_clean

    build_clean(tmp_path / "in", shards=2, per_shard=6)  # 12 rows, one exact duplicate
    out = tmp_path / f"clean-{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        PreprocessConfig, None, [f"input={tmp_path / 'in'}", f"output={out}", "clip.enabled=false"]
    )
    manifest = run_preprocess(cfg, log=lambda *_: None)
    assert manifest["reasons"] == {"duplicate_exact": 1}
    p = PROMETHEUS_PREFIX
    wanted = {p + "t2i_data_rows", p + "t2i_data_rows_per_s", p + "t2i_data_quarantined_rows"}
    # Ray's agent drops a gauge series not reported again within 2 export intervals (20 s by
    # default); the rows gauges were last set during the score phase. Wait past that: they must
    # still be there (each process re-reports its gauges' last values).
    time.sleep(25)
    seen = poll(ray_local, wanted, {"stage": "preprocess", "dataset": out.name}, lambda: True)
    assert wanted <= seen.keys(), f"never exported: {sorted(wanted - seen.keys())}"
    assert seen[p + "t2i_data_rows"][-1] == 12
    assert seen[p + "t2i_data_rows_per_s"][-1] > 0
    assert seen[p + "t2i_data_quarantined_rows"] == [1]


def test_loss_curve_is_drawn_from_the_last_row_of_each_step(tmp_path):
    rows = [
        {"step": 2, "loss": 4.0, "loss_disc": 1.0},
        {"step": 4, "loss": 3.0, "loss_disc": 0.9},
        {"step": 4, "loss": 2.5, "loss_disc": 0.8},  # a resumed run logged step 4 again
        {"step": 6, "loss": float("nan")},  # a skipped interval: no point
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_metrics_rows(str(path))
    assert [(r["step"], r["loss"]) for r in got[:2]] == [(2, 4.0), (4, 2.5)] and len(got) == 3
    png = Image.open(io.BytesIO(plot_loss_curve(got, title="run")))
    assert png.format == "PNG" and png.size == (600, 350)


def test_upload_copies_only_changed_monitoring_files(tmp_path):
    root, dest = tmp_path / "stage", fs.resolve(str(tmp_path / "run"))
    (root / "tensorboard").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "tensorboard" / "metrics.jsonl").write_text("a\n")
    (root / "images" / "x_step00000002.png").write_bytes(b"png")
    (root / "other.txt").write_text("not monitoring")
    synced = upload_changed(str(root), dest, {})
    assert sorted(synced) == ["images/x_step00000002.png", "tensorboard/metrics.jsonl"]
    assert (tmp_path / "run" / "tensorboard" / "metrics.jsonl").read_text() == "a\n"
    assert not (tmp_path / "run" / "other.txt").exists()
    (tmp_path / "run" / "images" / "x_step00000002.png").write_bytes(b"changed in storage")
    with open(root / "tensorboard" / "metrics.jsonl", "a") as f:
        f.write("b\n")
    again = upload_changed(str(root), dest, synced)
    assert (tmp_path / "run" / "tensorboard" / "metrics.jsonl").read_text() == "a\nb\n"
    # Unchanged locally: not uploaded again.
    assert (
        tmp_path / "run" / "images" / "x_step00000002.png"
    ).read_bytes() == b"changed in storage"
    assert again.keys() == synced.keys()


def test_every_exported_metric_is_documented():
    from data_pipeline.ray_metrics import DATA

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    docs = (repo / "docs" / "monitoring.md").read_text()
    for name in [*TRAIN, *DATA]:
        assert f"`{name}`" in docs, f"docs/monitoring.md does not explain {name}"
        assert name in readme, f"README's Monitoring section does not list {name}"
