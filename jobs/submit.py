"""`t2i submit`: run any `t2i` command on a cluster through the Ray Jobs API.

    t2i submit --address http://127.0.0.1:8265 -- train --config jobs/configs/dalle_digits.yaml
    t2i submit --address http://HEAD:8265 --no-wait -- preprocess --config ...
    t2i submit --address URL list                  # jobs: id, status, entrypoint
    t2i submit --address URL status JOB            # status and message
    t2i submit --address URL logs JOB [--follow]   # its log (--follow: until it ends)
    t2i submit --address URL stop JOB              # ask the cluster to stop it

The working directory (this checkout, minus .venv, runs/, data and caches) is uploaded as the job's
runtime env, so the cluster runs the code you have. Token auth stays on: the client presents
`~/.ray/auth_token` (RAY_AUTH_MODE=token). Credentials are never forwarded by this command: give
the cluster its own (instance roles, secrets), not your shell's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import time

from jobs.cli import run_module

# Never uploaded: environments, run outputs, data and caches (the job reads data from its paths).
EXCLUDES = [
    ".venv/",
    "runs/",
    "data/",
    "*.tar",
    "*.parquet",
    ".cache/",
    ".git/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
]
MANAGE = ("list", "status", "logs", "stop")  # `t2i submit ACTION [JOB]` instead of a command
AGENT_WAIT_S = 60.0
# Non-secret settings worth carrying to the job; never AWS_* credentials, and never
# DS_ACCELERATOR: each training worker sets its own from scaling.use_gpu (a `cpu` from this
# shell, e.g. the Makefile's, would turn the cluster's GPU workers into CPU ones).
FORWARD_ENV = ("TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run a t2i command on a Ray cluster via the Jobs API",
        description="Submit `t2i <command ...>` as a Ray job; streams its logs until it ends.",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="Jobs API address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
    )
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's code")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    p.add_argument(
        "command_args",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ... | list | status JOB | logs JOB [--follow] | stop JOB",
    )
    p.set_defaults(func=run)


def connect(address: str | None):
    """A Jobs API client that presents this machine's Ray token (auth stays on)."""
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (RuntimeError, ConnectionError) as e:
        raise ValueError(f"{address}: cannot use the Jobs API: {e}") from None


def manage(args: argparse.Namespace, action: str, rest: list[str]) -> int:
    """`list`, `status JOB`, `logs JOB [--follow]`, `stop JOB`."""
    if action != "list" and not rest:
        raise ValueError(f"submit {action}: give a job id (see `t2i submit list`)")
    client = connect(args.address)
    if action == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    job_id = rest[0]
    if action == "status":
        info = client.get_job_info(job_id)
        print(f"{job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
        return 0
    if action == "stop":
        stopped = client.stop_job(job_id)
        print(f"submit: job {job_id} " + ("stopping" if stopped else "was not running"))
        return 0
    if "--follow" in rest[1:]:
        return follow(client, job_id)
    print(client.get_job_logs(job_id), end="", flush=True)
    return 0


def follow(client, job_id: str) -> int:
    """Stream the job's log until it ends; 0 when it succeeded."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"submit: job {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def run(args: argparse.Namespace) -> int:
    cmd = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if not cmd:
        raise ValueError("nothing to submit: give a t2i command after --, e.g. -- train --config X")
    if cmd[0] in MANAGE and args.command_args[:1] != ["--"]:
        return manage(args, cmd[0], cmd[1:])
    client = connect(args.address)
    entrypoint = shlex.join(["t2i", *cmd])
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    runtime_env = {"working_dir": args.working_dir, "excludes": EXCLUDES, "env_vars": env}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint, submission_id=args.submission_id, runtime_env=runtime_env
            )
            break
        except RuntimeError as e:
            # A freshly started head answers before its job agent is up: wait for it, briefly.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    print(f"submit: job {job_id}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    return follow(client, job_id)


if __name__ == "__main__":
    run_module("submit")
