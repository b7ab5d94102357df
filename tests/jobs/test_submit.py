"""`t2i submit` against a real Ray head (its own process, dashboard + Jobs API on 127.0.0.1)."""

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    bindir = Path(sys.executable).parent
    temp = tmp_path_factory.mktemp("rayhead")
    token = temp / "auth_token"  # this cluster's own token, as an operator would provision it
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    gcs, dash = free_port(), free_port()
    # --block keeps this node's processes tied to one Popen: stopping it stops only this cluster
    # (`ray stop` would also kill the session's shared local Ray instance).
    head = subprocess.Popen(
        [
            str(bindir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=3",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp}",
            # Its own agent ports: the session's local Ray instance already holds the defaults.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=open(temp / "head.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:  # the Jobs API answers once the dashboard is up
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            break
        except urllib.error.HTTPError:  # answered (401 without a token): it is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                raise RuntimeError((temp / "head.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    try:
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)


def t2i_submit(
    address: str, env: dict, *command: str, timeout: float
) -> subprocess.CompletedProcess:
    """The installed `t2i submit --address ADDRESS --working-dir REPO -- COMMAND...`, as a user
    runs it."""
    t2i = str(Path(sys.executable).with_name("t2i"))
    return subprocess.run(
        [t2i, "submit", "--address", address, "--working-dir", str(REPO), "--", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_submit_runs_a_t2i_command_on_the_cluster(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "digits"
    r = t2i_submit(
        address, env, "data", "digits", "--out", str(out), "image_size=8", "photos=0", timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCEEDED" in r.stdout and "data: done" in r.stdout  # the job's own log, streamed
    assert (out / "manifest.json").exists()


def test_submit_train_runs_on_the_cluster(ray_head, tmp_path):
    """`t2i train` on a running cluster (not the test's local instance), through the Jobs API."""
    address, env = ray_head
    r = t2i_submit(
        address,
        {**env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "DS_ACCELERATOR": "cpu"},
        "train",
        "--config",
        "jobs/configs/dalle_tiny.yaml",
        "name=submitted",
        f"checkpoint.storage_path={tmp_path}",
        "steps=2",
        "log_every=1",
        "scaling.num_workers=1",
        "checkpoint.export_weights=false",
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "train: done" in r.stdout and "SUCCEEDED" in r.stdout
    assert (tmp_path / "submitted" / "checkpoints" / "step_00000002" / "manifest.json").exists()


def test_submit_needs_a_command_and_an_address(capsys):
    from jobs.cli import main

    assert main(["submit", "--address", "http://127.0.0.1:1"]) == 2
    assert "nothing to submit" in capsys.readouterr().err
