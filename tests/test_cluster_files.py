"""The cluster files are right by construction: we cannot start AWS or Kubernetes clusters here,
so each file is checked against the schema its tool applies, and for what it needs to run.

- cluster/aws.yaml: the JSON schema shipped in the installed ray package
  (ray/autoscaler/ray-schema.json), plus the shared auth token and parameterised images.
- cluster/kuberay/*.yaml: the KubeRay v1.6.0 CRD schemas (tests/cluster_schemas/, the CRDs'
  openAPIV3Schema with descriptions removed), made strict: like `kubectl apply --validate=strict`,
  an unknown field is an error (the API server would silently prune it).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "cluster_schemas"
IMAGE_IN_APP = "/app/"  # the Dockerfile's WORKDIR: repo files sit under it in the image
SECRET, SECRET_KEY = "ray-t2i-auth", "auth_token"  # KubeRay reads `auth_token` of authOptions'


# --------------------------------------------------------------------------------------------
# AWS cluster launcher
# --------------------------------------------------------------------------------------------


def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_config_validates_against_rays_own_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(aws(), schema)  # raises ValidationError naming the bad key
    # The validator is not vacuous: a misspelt top-level key is rejected.
    with pytest.raises(jsonschema.ValidationError, match="head_start_commands"):
        jsonschema.validate({**aws(), "head_start_commands": []}, schema)
    # What `ray up` runs before it contacts AWS: defaults merged, then the schema and its own
    # cross-checks (head type among the node types, min_workers within max_workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(aws())
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    # The token fetch survives the merge into each node type's setup commands.
    merged = prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    assert sum("aws_auth_token.sh" in c for c in merged) == 2


def test_aws_every_node_gets_the_same_token_from_secrets_manager():
    cfg, text = aws(), (CLUSTER / "aws.yaml").read_text()
    secret = cfg["metadata"]["parameters"]["auth_token_secret"]
    setup = cfg["setup_commands"]  # run on the head AND every worker, before `ray start`
    fetch = [c for c in setup if "aws_auth_token.sh" in c]
    assert fetch == [f"T2I_AUTH_TOKEN_SECRET={secret} bash ~/ray-t2i/cluster/aws_auth_token.sh"]
    for node_type in cfg["available_node_types"].values():  # no per-node override skips it
        assert "worker_setup_commands" not in node_type
    assert not cfg.get("head_setup_commands") and not cfg.get("worker_setup_commands")
    # Every `ray start` runs with token auth; nobody generates a second, different token.
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        env, _, rest = cmd.partition("ray start")
        assert env.startswith("RAY_AUTH_MODE=token ") and re.fullmatch(r"(\w+=\S+ )+", env), cmd
    assert "--generate" not in text and "get-auth-token" not in text
    # The head's dashboard stays on localhost (reached through `ray dashboard`'s SSH tunnel).
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)


def test_aws_images_and_instance_types_are_parameters():
    cfg = aws()
    params = cfg["metadata"]["parameters"]
    nodes = cfg["available_node_types"]
    assert {n["node_config"]["InstanceType"] for n in nodes.values()} == {
        params["head_instance_type"],
        params["gpu_instance_type"],
        params["h100_instance_type"],
        params["cpu_instance_type"],
    }
    for name in ("gpu_worker", "gpu_worker_h100"):
        assert nodes[name]["node_config"]["ImageId"] == params["gpu_image_id"]
    for name in ("head", "cpu_worker"):
        assert nodes[name]["node_config"]["ImageId"] == params["cpu_image_id"]
    for key in ("gpu_image_id", "cpu_image_id"):
        image = params[key]
        # A real image: an AMI id, or AWS's/Canonical's public SSM parameter resolved at launch.
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/\S+/ami-id", image)
        assert image != "ami-0123456789abcdef0"  # the old placeholder
    assert params["gpu_instance_type"].startswith(("p", "g"))  # a GPU instance family
    text = (CLUSTER / "aws.yaml").read_text()
    for key in params:  # each parameter is documented in the header
        assert re.search(rf"^#\s+{key}\s", text, re.M), f"{key} is not documented"
    for node in nodes.values():
        assert node["node_config"]["IamInstanceProfile"] == params["instance_profile"]


# EFA network cards per GPU instance type (AWS: p4d.24xlarge 4, p5.48xlarge 32)
EFA_CARDS = {"p4d.24xlarge": 4, "p5.48xlarge": 32}


def test_aws_gpu_nodes_have_efa_on_every_card_in_a_cluster_placement_group():
    """p4d and p5 node types: one EFA interface per network card (card 0 the primary, the rest
    EFA-only), every interface with the GPU subnet and the EFA security group (Ray's own
    NetworkInterfaces bootstrap accepts them), all in the cluster placement group; NCCL's EFA
    settings reach Ray's workers; training configs PACK their workers."""
    from ray.autoscaler._private.aws.config import (
        _configure_subnets_and_groups_from_network_interfaces,
    )

    cfg = aws()
    params = cfg["metadata"]["parameters"]
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if n.startswith("gpu")}
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} == set(EFA_CARDS)
    for name, t in gpu_types.items():
        nc = t["node_config"]
        nics = nc["NetworkInterfaces"]
        assert [n["NetworkCardIndex"] for n in nics] == list(range(EFA_CARDS[nc["InstanceType"]]))
        assert [(n["DeviceIndex"], n["InterfaceType"]) for n in nics] == [(0, "efa")] + [
            (1, "efa-only")
        ] * (len(nics) - 1), name
        for n in nics:
            assert n["SubnetId"] == params["gpu_subnet_id"]
            assert n["Groups"] == [params["efa_security_group"]]
        assert nc["Placement"] == params["gpu_placement_group"]
        bootstrapped = _configure_subnets_and_groups_from_network_interfaces(nc)
        assert bootstrapped["SubnetIds"] == [params["gpu_subnet_id"]] * len(nics)
    text = (CLUSTER / "aws.yaml").read_text()
    assert "--strategy cluster" in text  # how to create the placement group is documented
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "FI_PROVIDER=efa" in worker_start and "FI_EFA_USE_DEVICE_RDMA=1" in worker_start
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig

    for name in ("dalle_1b3.yaml", "dalle_12b.yaml", "dalle_350m.yaml"):
        train = load_config(TrainConfig, REPO / "jobs" / "configs" / name)
        assert train.scaling.placement_strategy == "PACK", name


def test_aws_token_script_writes_a_private_file_and_never_prints_the_token(tmp_path):
    token = "t0k3n-" + os.urandom(8).hex()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake_aws = bin_dir / "aws"  # stands in for the AWS CLI: records its arguments
    fake_aws.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\necho {token}\n')
    fake_aws.chmod(0o755)
    dest = tmp_path / "home" / ".ray" / "auth_token"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "AWS_REGION": "us-west-2",
        "T2I_AUTH_TOKEN_SECRET": "ray-t2i/auth-token",
    }
    r = subprocess.run(
        ["bash", str(CLUSTER / "aws_auth_token.sh")], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert dest.read_text() == token
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert token not in r.stdout + r.stderr
    args = calls.read_text()
    assert "secretsmanager get-secret-value" in args and "--secret-id ray-t2i/auth-token" in args
    assert "--region us-west-2" in args

    fake_aws.write_text("#!/bin/sh\necho 'AccessDeniedException' >&2\nexit 254\n")
    r = subprocess.run(
        ["bash", str(CLUSTER / "aws_auth_token.sh")], env=env, capture_output=True, text=True
    )
    assert r.returncode != 0 and "secretsmanager:GetSecretValue" in r.stderr
    assert dest.read_text() == token  # a failed fetch leaves the previous token in place


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------

MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-train.yaml": "RayJob",
    "rayjob-preprocess.yaml": "RayJob",
}


def strict(schema):
    """A Kubernetes structural schema as strict JSON Schema: objects with `properties` reject
    unknown fields unless the CRD says to preserve them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schema(kind: str) -> dict:
    path = SCHEMAS / f"kuberay-v1.6.0-{kind.lower()}.schema.json.gz"
    return strict(json.loads(gzip.decompress(path.read_bytes())))


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict):
    """(what, pod spec) of the head, every worker group, and a RayJob's submitter."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec.get("workerGroupSpecs", []):
        yield f"worker group {g['groupName']}", g["template"]["spec"]
    if doc["kind"] == "RayJob":
        yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_validates_against_the_crd(name):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == MANIFESTS[name]
    schema = crd_schema(doc["kind"])
    jsonschema.validate(doc, schema)
    # Strictness works: a misspelt field (KubeRay would drop it silently) fails.
    bad = json.loads(json.dumps(doc))
    cluster_spec(bad)["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_token_auth_from_the_secret_in_every_container(name):
    doc = manifest(name)
    spec = cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}
    # KubeRay refuses token auth below Ray 2.52; the image's Ray is the one installed here.
    assert spec["rayVersion"] == ray.__version__
    for what, pod in pod_specs(doc):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, what
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": SECRET, "key": SECRET_KEY}, what
            assert "value" not in env["RAY_AUTH_TOKEN"], f"{what}: a literal token"
            assert not any(k.startswith("AWS_SECRET") or k == "AWS_ACCESS_KEY_ID" for k in env)
    text = (KUBERAY / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|stringData|kind: Secret", text)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_dashboard_reachable_through_the_head_service_only(name):
    head = cluster_spec(manifest(name))["headGroupSpec"]
    # Inside the pod the dashboard must listen beyond loopback: the head Service (and a RayJob's
    # submitter, which runs `ray job submit` against <cluster>-head-svc:8265) connect to it.
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["serviceType"] == "ClusterIP" and head.get("enableIngress") is False
    assert "headService" not in head  # no LoadBalancer / NodePort override
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080
    for p in head["template"]["spec"]["containers"][0]["ports"]:
        assert "hostPort" not in p


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_groups_resources_image_and_service_account(name):
    doc = manifest(name)
    spec = cluster_spec(doc)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}  # GPU and CPU worker groups
    images = set()
    for what, pod in pod_specs(doc):
        c = pod["containers"][0]
        images.add(c["image"])
        res = c["resources"]
        assert res["limits"] == res["requests"], what  # Ray sizes itself from the limits
        assert {"cpu", "memory"} <= res["limits"].keys(), what
        if what != "submitter":
            assert pod["serviceAccountName"] == "ray-t2i", what  # S3 via IRSA
    assert len(images) == 1 and re.fullmatch(r"[\w.\-/:]+/ray-t2i:[\w.\-]+", images.pop())
    assert (
        "nvidia.com/gpu"
        in groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    assert (
        "nvidia.com/gpu"
        not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        # KubeRay rejects resource fields in both rayStartParams and the group's resources.
        assert not ({"num-cpus", "num-gpus", "memory"} & g["rayStartParams"].keys())


@pytest.mark.parametrize(
    "name,command,config",
    [
        ("rayjob-train.yaml", "train", "jobs/configs/dalle_1b3.yaml"),
        ("rayjob-preprocess.yaml", "preprocess", "jobs/configs/preprocess_laion.yaml"),
    ],
)
def test_kuberay_job_entrypoint_runs_a_t2i_command_with_a_real_config(name, command, config):
    from data_pipeline.config import load_config
    from data_pipeline.preprocess.config import PreprocessConfig
    from trainer.config import TrainConfig

    doc = manifest(name)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["t2i", command, "--config"]
    assert argv[3] == IMAGE_IN_APP + config and (REPO / config).exists()
    # The overrides are valid keys of that command's config (a typo would fail the job late).
    cls = TrainConfig if command == "train" else PreprocessConfig
    cfg = load_config(cls, REPO / config, argv[4:])
    paths = [cfg.data.path, cfg.checkpoint.storage_path] if command == "train" else [cfg.output]
    assert all(p.startswith("s3://") for p in paths)
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    if command == "train":  # enough GPU workers for the config's scaling
        gpu = cluster_spec(doc)["workerGroupSpecs"][0]
        per_pod = int(
            gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        )
        assert cfg.scaling.use_gpu and gpu["replicas"] * per_pod >= cfg.scaling.num_workers


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-train.yaml"])
def test_kuberay_training_gpu_pods_have_what_nccl_needs(name):
    """The GPU pods that train (NCCL between pods): EFA devices from the EFA device plugin,
    IPC_LOCK (EFA pins memory for RDMA), a memory-backed /dev/shm (NCCL's intra-node buffers;
    the container default is 64 MiB), and NCCL/libfabric set to use EFA."""
    spec = cluster_spec(manifest(name))
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    pod = gpu["template"]["spec"]
    c = pod["containers"][0]
    for k in ("limits", "requests"):
        assert int(c["resources"][k]["vpc.amazonaws.com/efa"]) >= 1, k
    assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
    shm = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert any(v["name"] in shm and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"


def test_dockerfile_copies_what_the_jobs_run():
    text = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", text, re.M))
    assert {"data_pipeline", "trainer", "jobs", "benchmarks"} <= copied  # gpu_smoke runs in it
    assert "efa_installer.sh" in text  # libfabric + aws-ofi-nccl for NCCL over EFA
