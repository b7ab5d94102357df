"""Fixtures shared by all tests: a real S3 protocol server (moto) on loopback for the session,
a local Ray instance, fault injection, and one intra-op thread for tiny tensors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

# The venv's tools first (also for the Ray workers this process starts): one `ninja` builds
# DeepSpeed's ops for the driver and the workers alike (see the Makefile's PATH line).
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start `moto_server` on 127.0.0.1:<free port>; point the AWS environment at it.

    Yields the endpoint URL. Credentials are throwaway values set only in this process's
    environment (and inherited by Ray workers it starts), as users would set real ones.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start; log:\n{log.read_text()}") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "moto-test-key",
        "AWS_SECRET_ACCESS_KEY": "moto-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields its name."""
    import boto3

    name = f"t2i-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory):
    """One local Ray instance for the whole test session (started after the S3 fixture so that
    workers inherit its environment). Logical CPUs exceed the 2 real cores so a 2-worker trainer
    and Ray Data tasks can be scheduled together; tests keep their work tiny."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # keep test logs readable
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache/torch_extensions")
    )
    ray.init(num_cpus=6, include_dashboard=False, logging_level="warning", log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def killed_job(ray_local, tmp_path):
    """Run a job's CLI (`python -m jobs.<job> ...`) as its own Ray driver on the session's Ray,
    with `$T2I_FAULT` set to kill it once `phase` has committed K times
    (data_pipeline/resumable.py `Fault`). Checks that it died by SIGKILL at exactly that point,
    waits until Ray has ended the dead driver's tasks (so the next run gets the CPUs), and
    returns the driver's stdout."""
    import json
    import signal

    from data_pipeline.resumable import FAULT_ENV, KILLED_FILE

    repo = Path(__file__).resolve().parents[1]
    address = ray_local.get_runtime_context().gcs_address

    def run(job: str, overrides: list[str], phase: str, after: int) -> str:
        barrier = tmp_path / f"fault-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, FAULT_ENV: f"{phase}:{after}:{barrier}", "PYTHONUNBUFFERED": "1"}
        r = subprocess.run(
            [sys.executable, "-m", f"jobs.{job}", *overrides, f"ray.address={address}"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
        killed = json.loads((barrier / KILLED_FILE).read_text())
        assert killed == {"job": job, "phase": phase, "commits": after}
        _wait_for_free_cpus(ray_local)
        return r.stdout

    return run


def _wait_for_free_cpus(ray, timeout_s: float = 60.0) -> None:
    """Until every CPU of the session's Ray is free again: a killed driver's tasks (some wait
    forever past the kill point) hold theirs until Ray ends its job."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"a killed driver's tasks still hold CPUs after {timeout_s:.0f}s")
        time.sleep(0.1)


# Of every 131 S3 requests one gets a 503, one a reset connection and one a late answer: a job of
# the tests' size (150-250 requests) meets each once or twice, in different phases. Few, since
# each retry backs off ~0.5 s (the AWS standard strategy: up to 1 s before the first retry).
S3_FAULTS = ((131, 5, "503"), (131, 45, "reset"), (131, 85, "delay"))


@pytest.fixture
def s3_fault_proxy(s3_server):
    """tests/s3_fault_proxy.py's proxy in front of the moto server, injecting `S3_FAULTS`; use
    `proxy.url` as a job's `storage.endpoint_url`, and `proxy.seen` to check what it injected."""
    from tests.s3_fault_proxy import FaultProxy, combine, every

    with FaultProxy(s3_server, combine(*(every(*f) for f in S3_FAULTS)), delay_s=0.3) as proxy:
        yield proxy


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread; OpenMP spin-waits are slow on busy shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_of_one():
    """A real gloo process group of one rank in this test process (what Ray Train sets up), for
    one test module. DeepSpeed caches its communication backend in a module global that would
    outlive the group (its backend, and `groups._WORLD_GROUP`, the clone of the world group it
    broadcasts over): both are reset with the group, so each module's engine adopts its own."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    def forget():
        ds_comm.cdb = None
        ds_groups._WORLD_GROUP = None

    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this test process")
    forget()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
        forget()


@pytest.fixture(scope="session")
def lazy():
    """torch's lazy-tensor device (TorchScript backend on this CPU): not the CPU. Its backend can
    be registered once per process, hence one fixture for the session."""
    import torch
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy", 0)
