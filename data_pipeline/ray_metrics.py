"""Metrics for the Ray dashboard's Metrics view: thin wrappers over `ray.util.metrics`.

Each process records into its own Ray core worker, which pushes to the node's metrics agent every
`metrics_report_interval_ms` (10 s by default; flushed when the process leaves Ray); the agent
serves them in Prometheus text on the node's metrics export port (`ray.nodes()[i]
["MetricsExportPort"]`), which Prometheus scrapes and the dashboard's Grafana panels query.
Prometheus sees every name with Ray's `ray_` prefix: `t2i_train_loss` is `ray_t2i_train_loss`.

What each metric means is documented here, once, in `TRAIN` and `DATA` (docs/monitoring.md and the
README's "Monitoring" section list the same table). Recording is a no-op outside Ray, so library
code can call it unconditionally.

Gauges hold their last value: Ray's agent drops a gauge series that was not reported again within
two export intervals (measured with Ray 2.60: a value set once is gone from the endpoint after
~20 s), and a training log interval or a data phase can be much longer than that. So every
process re-sets its gauges' last values every `REFRESH_S` from one daemon thread, for as long as
the process lives (a finished Train worker or driver stops, and its series age out).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

PROMETHEUS_PREFIX = "ray_"  # Ray prepends it to every application metric
REFRESH_S = 5.0  # < half of Ray's default 10 s export interval: a gauge never ages out


@dataclass(frozen=True)
class Spec:
    """One exported metric: its kind and what it means."""

    kind: str  # "gauge" | "counter"
    description: str


# Training, recorded by rank 0 at every log step (trainer/metrics.py). Tags: run, objective.
TRAIN_TAGS = ("run", "objective")
TRAIN: dict[str, Spec] = {
    "t2i_train_loss": Spec("gauge", "Training loss, mean over the last log interval (rank 0)"),
    "t2i_train_tokens_per_s": Spec(
        "gauge",
        "Tokens per second, all workers (the objective's unit: text+image tokens for dalle, code "
        "cells for dvae/vqgan, latent positions for klae, latents for ldm)",
    ),
    "t2i_train_samples_per_s": Spec("gauge", "Training samples per second, all workers"),
    "t2i_train_step_seconds": Spec(
        "gauge", "Wall seconds per optimizer step, mean over the last log interval"
    ),
    "t2i_train_mfu": Spec(
        "gauge", "Model FLOP utilisation: achieved model FLOP/s of one worker over its peak"
    ),
    "t2i_train_checkpoint_seconds": Spec(
        "gauge", "Wall seconds the last checkpoint took (stage, upload, manifest) on rank 0"
    ),
    "t2i_train_step": Spec("gauge", "Optimizer steps completed"),
    "t2i_train_lr": Spec("gauge", "Learning rate of the first part's optimizer"),
    "t2i_train_grad_norm": Spec("gauge", "Global gradient norm of the last applied step"),
}
# Which key of the training loop's metrics row feeds each of them.
TRAIN_KEYS = {
    "t2i_train_loss": "loss",
    "t2i_train_tokens_per_s": "tokens_per_s",
    "t2i_train_samples_per_s": "samples_per_s",
    "t2i_train_step_seconds": "step_time_s",
    "t2i_train_mfu": "mfu",
    "t2i_train_checkpoint_seconds": "checkpoint_s",
    "t2i_train_step": "step",
    "t2i_train_lr": "lr",
    "t2i_train_grad_norm": "grad_norm",
}

# Ray Data plans (preprocess, tokenize), recorded by the driver. Tags: stage, dataset; quarantine
# also by reason.
DATA_TAGS = ("stage", "dataset")
DATA: dict[str, Spec] = {
    "t2i_data_rows_per_s": Spec("gauge", "Rows committed per second since the stage started"),
    "t2i_data_rows": Spec("gauge", "Rows committed so far by this run of the stage"),
    "t2i_data_quarantined_rows": Spec(
        "gauge", "Samples quarantined (rejected with a reason) in the finished dataset, by reason"
    ),
}


def ray_ready() -> bool:
    """True in a process connected to Ray (a driver after `ray.init`, any Ray worker)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class MetricSet:
    """The metrics of `specs`, created lazily in this process (Ray metric objects belong to the
    process that records them), each with the tag keys `tag_keys` (+ `extra_tags`)."""

    def __init__(self, specs: dict[str, Spec], tag_keys: tuple[str, ...], extra_tags=()):
        self.specs, self.tag_keys = specs, tuple(tag_keys) + tuple(extra_tags)
        self._metrics: dict = {}
        self._last: dict[tuple, tuple[str, float, dict]] = {}  # gauge series -> last value
        self._lock = threading.Lock()

    def _metric(self, name: str):
        if name not in self._metrics:
            from ray.util.metrics import Counter, Gauge

            spec = self.specs[name]  # KeyError: an undocumented metric
            cls = Gauge if spec.kind == "gauge" else Counter
            self._metrics[name] = cls(name, description=spec.description, tag_keys=self.tag_keys)
        return self._metrics[name]

    def record(self, values: dict[str, float], tags: dict[str, str]) -> None:
        """Set gauges (or add to counters) `{name: value}` under `tags`; NaN/None are skipped."""
        if not ray_ready():
            return
        tags = {k: str(v) for k, v in tags.items()}
        for name, value in values.items():
            if value is None or value != value:
                continue
            metric = self._metric(name)
            if self.specs[name].kind == "gauge":
                metric.set(float(value), tags=tags)
                with self._lock:
                    self._last[(name, *sorted(tags.items()))] = (name, float(value), tags)
                _keep_fresh(self)
            else:
                metric.inc(float(value), tags=tags)

    def refresh(self) -> None:
        """Report every gauge series' last value again (see the module docstring)."""
        with self._lock:
            last = list(self._last.values())
        for name, value, tags in last:
            self._metric(name).set(value, tags=tags)


# The one refresher of this process and the metric sets it keeps fresh (process-local state:
# Ray metric objects cannot cross processes, so each process refreshes its own).
_fresh: list[MetricSet] = []
_fresh_lock = threading.Lock()
_refresher: threading.Thread | None = None


def _keep_fresh(metrics: MetricSet) -> None:
    global _refresher
    with _fresh_lock:
        if not any(m is metrics for m in _fresh):
            _fresh.append(metrics)
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh_forever, name="t2i-metrics", daemon=True)
            _refresher.start()


def _refresh_forever() -> None:
    while True:
        time.sleep(REFRESH_S)
        if not ray_ready():
            continue
        with _fresh_lock:
            sets = list(_fresh)
        for m in sets:
            try:
                m.refresh()
            except Exception as e:  # e.g. Ray shut down mid-refresh: say so, keep the thread
                print(f"[t2i] metrics refresh failed: {e!r}", flush=True)


class DataStageMetrics:
    """rows/s and quarantine counts of one Ray Data plan run (`stage` = preprocess | tokenize),
    tagged with the output dataset's name."""

    def __init__(self, stage: str, output_uri: str):
        self.tags = {"stage": stage, "dataset": output_uri.rstrip("/").rsplit("/", 1)[-1]}
        self._rows = MetricSet({k: DATA[k] for k in ("t2i_data_rows_per_s", "t2i_data_rows")},
                               DATA_TAGS)  # fmt: skip
        self._quarantine = MetricSet(
            {"t2i_data_quarantined_rows": DATA["t2i_data_quarantined_rows"]}, DATA_TAGS, ("reason",)
        )

    def rows(self, rows: int, seconds: float) -> None:
        """`rows` committed in `seconds` since this run of the stage started."""
        self._rows.record(
            {"t2i_data_rows": rows, "t2i_data_rows_per_s": rows / max(seconds, 1e-9)}, self.tags
        )

    def quarantined(self, by_reason: dict[str, int]) -> None:
        """Quarantined samples of the finished dataset, {reason: count}."""
        for reason, n in by_reason.items():
            self._quarantine.record(
                {"t2i_data_quarantined_rows": n}, {**self.tags, "reason": reason}
            )
