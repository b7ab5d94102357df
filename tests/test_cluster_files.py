"""The cluster files parse, and keep the security defaults (token auth, localhost dashboard)."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_aws_launcher_keeps_auth_and_localhost_dashboard():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()


def test_kuberay_job_runs_t2i_with_token_auth():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("t2i train --config")
    env = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
    cfg = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert (CLUSTER.parent / cfg).exists()
