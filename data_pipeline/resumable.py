"""What `t2i preprocess` and `t2i tokenize` share to be resumable: the plan record that pins an
output directory to its inputs and settings, the config values that determine the outputs,
reading input shards as Ray tasks, the one commit of a Parquet part, and the kill point of the
resume tests.

A rerun into the same output compares the recorded `_work/plan.json` with its own plan: equal,
it resumes the committed work; different, it refuses with the path to delete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import columns as C
from data_pipeline import fs
from data_pipeline.config import StorageConfig
from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows
from data_pipeline.writer import WORK_DIR

# Fields that say where and how fast a job runs, not what it produces.
RUN_KEYS = ("output", "storage", "ray", "keep_work", "decode_batch_size")
POOL_KEYS = ("concurrency", "num_gpus", "num_cpus")  # of an actor-pool section
FAULT_ENV = "T2I_FAULT"  # "<phase>:<K>:<barrier dir>": kill the driver after K commits (Fault)
KILLED_FILE = "killed.json"  # in the barrier directory: {"job", "phase", "commits"}


def result_config(cfg, *, extra: tuple[str, ...] = (), pools: tuple[str, ...] = ()) -> dict:
    """The config values that determine the outputs: `cfg` without `RUN_KEYS` + `extra`, and
    without the resources (`POOL_KEYS`) of its actor-pool sections `pools`."""
    d = dataclasses.asdict(cfg)
    for k in RUN_KEYS + extra:
        d.pop(k)
    for sec in pools:
        for k in POOL_KEYS:
            d[sec].pop(k)
    return d


def record_plan(out: fs.Location, plan: dict, *, job: str, differs: str, log) -> None:
    """Write `plan` to `<out>/_work/plan.json`, or, on a rerun, check it is the same one;
    `differs` names what may differ in the error ("inputs or settings")."""
    loc = out.join(WORK_DIR, "plan.json")
    data = json.dumps(plan, indent=2, sort_keys=True).encode()
    if not fs.exists(loc):
        fs.write_bytes_atomic(loc, data)
    elif fs.read_bytes(loc) != data:
        raise ValueError(
            f"{out.uri} holds unfinished work from different {differs} ({loc.uri}); use a new "
            f"output path or delete that one"
        )
    else:
        log(f"{job}: resuming unfinished work in {out.uri}")


def read_shard_task(
    item: dict, *, limits: ReaderLimits, storage: StorageConfig | None
) -> list[dict]:
    """Ray task: one input shard -> its rows, minus rows an earlier run already committed."""
    rows = read_shard_rows(item[C.SOURCE_SHARD], limits, storage=storage)
    skip = set(json.loads(item["skip"]))
    for r in rows:
        r[C.SHARD_IDX] = item[C.SHARD_IDX]
        r[C.SOURCE_SHARD] = item[C.SOURCE_SHARD]
        r[C.SHARD_ROWS] = len(rows)
    return [r for r in rows if r[C.SEQ] not in skip]


@dataclasses.dataclass(frozen=True)
class Fault:
    """The kill point of the resume tests: once `phase` has committed `after` times, the driver
    (`driver_pid`) is SIGKILLed, so no cleanup runs, as in a real kill, and no later commit of
    any phase lands, so what a rerun finds is the same every time.

    The count is kept where commits happen (Ray tasks, `commit_point`), not by the driver as it
    sees results: by then more tasks may have committed. Each commit of `phase` first takes a
    numbered ticket in `barrier` (a file created exclusively); tickets 1..K commit and later ones
    wait, uncommitted, until Ray ends them with the dead driver's job. The commit that makes K
    writes `barrier/killed.json` and kills the driver; commits of other phases that start after
    it wait too. `barrier` is a local directory: driver and tasks share one machine (tests).
    """

    job: str
    phase: str
    after: int  # K
    barrier: str
    driver_pid: int


def fault_from_env(job: str, phases: tuple[str, ...]) -> Fault | None:
    """The driver's kill point from `$T2I_FAULT` ("<phase>:<K>:<dir>", `phase` one of `phases`,
    `dir` new or empty), or None when unset. Pass it to the tasks that commit."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    phase, after, barrier = (spec.split(":", 2) + ["", ""])[:3]
    if phase not in phases or not after.isdigit() or int(after) < 1 or not barrier:
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: expected <phase>:<K>:<dir> with phase one of {phases} "
            f"for {job}, K >= 1 and a local directory"
        )
    os.makedirs(barrier, exist_ok=True)
    if os.listdir(barrier):
        raise ValueError(f"{FAULT_ENV}: barrier directory {barrier} is not empty")
    return Fault(job, phase, int(after), os.path.abspath(barrier), os.getpid())


@dataclasses.dataclass
class JobContext:
    """What a resumable job's phases share: its config, output, sorted input shards, reader
    limits, log, and the resume tests' kill point (None in real runs). Each job extends it."""

    cfg: object
    out: fs.Location
    shards: list[str]
    limits: ReaderLimits
    log: object
    fault: Fault | None

    @property
    def storage(self) -> dict:
        """The `fn_kwargs` that give a Ray task the job's S3 endpoint, region, retries and
        timeouts (a `StorageConfig` is a small picklable dataclass)."""
        return {"storage": self.cfg.storage}


@contextlib.contextmanager
def commit_point(fault: Fault | None, phase: str) -> Iterator[None]:
    """Wrap one commit of `phase`, in the task that writes it; without a `fault`, it does
    nothing. With one, see `Fault`: this commit goes ahead, or waits for its job to end."""
    if fault is None:
        yield
        return
    killed = os.path.join(fault.barrier, KILLED_FILE)
    if os.path.exists(killed):
        _wait_for_kill(fault)
    if phase != fault.phase:
        yield
        return
    ticket = 1
    while True:  # the lowest free number
        try:
            open(os.path.join(fault.barrier, f"{phase}-{ticket}.ticket"), "x").close()
            break
        except FileExistsError:
            ticket += 1
    if ticket > fault.after:
        _wait_for_kill(fault)
    yield
    open(os.path.join(fault.barrier, f"{phase}-{ticket}.done"), "x").close()
    done = [n for n in os.listdir(fault.barrier) if n.endswith(".done")]
    if len(done) == fault.after:  # every commit before the kill point has landed
        record = {"job": fault.job, "phase": phase, "commits": fault.after}
        tmp = f"{killed}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, killed)
        print(f"{fault.job}: fault injection: {fault.after} {phase} commit(s) landed; "
              f"killing the driver (pid {fault.driver_pid})", flush=True)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            os.kill(fault.driver_pid, signal.SIGKILL)


def _wait_for_kill(fault: Fault, timeout_s: float = 300.0) -> None:
    """Past the kill point: never commit. Ray ends this task with the killed driver's job; the
    timeout only turns a driver that outlived its kill into an error instead of a hang."""
    time.sleep(timeout_s)
    raise RuntimeError(f"{fault.job}: fault injection: the driver (pid {fault.driver_pid}) was "
                       f"not ended {timeout_s:.0f}s after its kill point")  # fmt: skip


def commit_part(
    table: pa.Table,
    batch: dict,
    *,
    parts_uri: str,
    storage: StorageConfig | None,
    fault: Fault | None,
    phase: str,
    meta_key: bytes,
    extra: dict | None = None,
) -> tuple[fs.Location, str, str]:
    """Commit `table` (the rows of `batch`) as one Parquet part, named by the (shard, seq) rows it
    holds, so a retried task rewrites the same name. Its footer (`meta_key`) counts the rows per
    shard and each shard's total, plus the job's `extra` counts, so resume reads no data. The
    write is a commit of `phase` for the fault hook. Returns (location, name, footer JSON)."""
    shard_idx = batch[C.SHARD_IDX].tolist()
    ident = sorted(zip(shard_idx, batch[C.SEQ].tolist(), strict=True))
    name = hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]
    rows: dict[str, int] = {}
    totals: dict[str, int] = {}
    for s, total in zip(shard_idx, batch[C.SHARD_ROWS].tolist(), strict=True):
        rows[str(s)] = rows.get(str(s), 0) + 1
        totals[str(s)] = total
    meta = json.dumps({"rows": rows, "shard_rows": totals, **(extra or {})})
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({meta_key: meta.encode()}), buf)
    loc = fs.resolve(parts_uri, storage=storage).join(f"part-{name}.parquet")
    with commit_point(fault, phase):
        fs.write_bytes_atomic(loc, buf.getvalue())
    return loc, name, meta
