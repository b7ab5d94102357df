"""What the data benchmarks' `--real` modes share: real photos at real sizes in img2dataset's
layout (`data_pipeline.photos`: scikit-image photos cropped/resized with jitter to 256-768 px
JPEGs, a `.json` and a parquet sidecar per shard), and the memory figures of a run: the
driver's peak RSS and the Ray object store's peak use, polled while the plan runs.

The last line of a `--real` run reads
`ratio_vs_model=<f> scale_4x_time=<f> driver_peak_gib=<f> object_store_peak_gib=<f>`:
plan throughput on 4x the data / the bare model forward on the same decoded images (goal >= 0.9),
time(4x data) / time(1x) (goal <= 4.2), and the two memory peaks of the 4x run (their 1x values
are printed above it; goal: 4x <= 1.2 x 1x).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


def build_real(root: Path, samples: int) -> tuple[list[str], list[str]]:
    """(1x shards, 4x shards): `4 * samples` photos in 32 shards; the 1x set is the first 8."""
    from data_pipeline.photos import PhotosConfig, build_photos

    per_shard = max(1, samples // 8)
    uris = build_photos(PhotosConfig(out=str(root / "photos"), samples=32 * per_shard,
                                     samples_per_shard=per_shard), log=lambda *_: None)  # fmt: skip
    return uris[:8], uris


class MemoryPeaks:
    """Polls (every `every_s`) this process's RSS and the Ray object store's bytes in use
    (the raylet's own accounting, `object_store_bytes_used`) while the block runs."""

    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self.driver_gib = 0.0
        self.store_gib = 0.0
        self._stop = threading.Event()

    def _poll(self):
        import psutil
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        proc = psutil.Process()
        state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this job's Ray
        while not self._stop.is_set():
            self.driver_gib = max(self.driver_gib, proc.memory_info().rss / 2**30)
            try:
                used = get_memory_info_reply(state).store_stats.object_store_bytes_used
                self.store_gib = max(self.store_gib, used / 2**30)
            except Exception:  # noqa: BLE001 - a missed poll is not a figure
                pass
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn, *args, **kwargs):
    """(seconds, result, MemoryPeaks) of one call."""
    with MemoryPeaks() as mem:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        took = time.perf_counter() - t0
    return took, result, mem


def last_line(ratio: float, t1: float, t4: float, mem1: MemoryPeaks, mem4: MemoryPeaks) -> str:
    print(f"memory 1x: driver {mem1.driver_gib:.3f} GiB, object store {mem1.store_gib:.3f} GiB; "
          f"4x: driver {mem4.driver_gib:.3f} GiB, object store {mem4.store_gib:.3f} GiB",
          flush=True)  # fmt: skip
    return (f"ratio_vs_model={ratio:.3f} scale_4x_time={t4 / t1:.3f} "
            f"driver_peak_gib={mem4.driver_gib:.3f} object_store_peak_gib={mem4.store_gib:.3f}")  # fmt: skip
