"""What `t2i preprocess` and `t2i tokenize` share to be resumable: the plan record that pins an
output directory to its inputs and settings, the config values that determine the outputs,
reading input shards as Ray tasks, and the fault-injection hook of the resume tests.

A rerun into the same output compares the recorded `_work/plan.json` with its own plan: equal,
it resumes the committed work; different, it refuses with the path to delete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

from data_pipeline import columns as C
from data_pipeline import fs
from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows
from data_pipeline.writer import WORK_DIR

# Fields that say where and how fast a job runs, not what it produces.
RUN_KEYS = ("output", "storage", "ray", "keep_work", "decode_batch_size")
POOL_KEYS = ("concurrency", "num_gpus", "num_cpus")  # of an actor-pool section


class InjectedFault(RuntimeError):
    """Raised by the fault hook (tests of resume): the driver stops as if killed."""


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


def read_shard_task(item: dict, *, limits: ReaderLimits, endpoint_url, region) -> list[dict]:
    """Ray task: one input shard -> its rows, minus rows an earlier run already committed."""
    rows = read_shard_rows(item[C.SOURCE_SHARD], limits, endpoint_url=endpoint_url, region=region)
    skip = set(json.loads(item["skip"]))
    for r in rows:
        r[C.SHARD_IDX] = item[C.SHARD_IDX]
        r[C.SOURCE_SHARD] = item[C.SOURCE_SHARD]
        r[C.SHARD_ROWS] = len(rows)
    return [r for r in rows if r[C.SEQ] not in skip]


def fault_hook(env: str, phase: str, commits: int, *, job: str, kill: bool) -> None:
    """Fault injection for resume tests: `$env` = "<phase>:K" stops the driver once `phase` has
    committed K times, by SIGKILL (`kill`: no cleanup runs) or by raising `InjectedFault`."""
    spec = os.environ.get(env, "")
    if not spec or spec.split(":")[0] != phase or commits < int(spec.split(":")[1]):
        return
    if kill:
        print(f"{job}: fault injection: killing the driver after {commits} {phase} commits",
              flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"{job}: fault injection after {commits} {phase} commit(s)")
