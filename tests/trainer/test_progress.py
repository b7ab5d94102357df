"""The driver-side progress line: quiet off a terminal, always a final line, rate and ETA."""

from __future__ import annotations

import io

from trainer.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_output_is_throttled_and_ends_with_the_total():
    out = io.StringIO()
    p = Progress("sample", 10, "candidates", every_s=3600, out=out)
    for _ in range(10):
        p.update(1, loss=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # nothing until the end, then one line
    assert lines[0].startswith("sample: 10/10 candidates [") and "ETA 0s" in lines[0]
    assert lines[0].endswith("loss=0.5")


def test_terminal_output_redraws_one_line():
    out = Tty()
    p = Progress("train", 3, "steps", out=out)
    for _ in range(3):
        p.update()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "train: 2/3 steps" in text


def test_train_progress_follows_the_runs_metrics_log(tmp_path):
    import json

    from data_pipeline.config import load_config
    from trainer.config import TrainConfig
    from trainer.launch import TrainProgress

    cfg = load_config(TrainConfig, None, ["name=run", f"checkpoint.storage_path={tmp_path}",
                                          "steps=10"])  # fmt: skip
    log = tmp_path / "run" / "tensorboard" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"step": 2, "loss": 3.0}) + "\n")  # a previous attempt's rows
    out = io.StringIO()
    watch = TrainProgress(cfg, out=out)
    watch.begin()
    assert watch.progress.done == watch.progress.start == 2
    with log.open("a") as f:
        f.write(json.dumps({"step": 10, "loss": 1.25, "samples_per_s": 64.0}) + "\n")
        f.write('{"step": 11, "lo')  # a row still being written is skipped, not an error
    watch.poll()
    line = out.getvalue().strip()
    assert line.startswith("train run: 10/10 steps [") and line.endswith("loss=1.25 samples_per_s=64")


def test_train_progress_never_fails_the_run_on_unreadable_storage(tmp_path):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig
    from trainer.launch import TrainProgress

    cfg = load_config(TrainConfig, None, ["name=run", "steps=10",
                                          f"checkpoint.storage_path={tmp_path}/file"])  # fmt: skip
    (tmp_path / "file").write_text("a file where the run directory should be")
    watch = TrainProgress(cfg, out=io.StringIO())
    watch.begin()
    watch.poll()  # reading <file>/run/tensorboard/metrics.jsonl fails: no error, no progress
    assert watch.progress.done == 0
