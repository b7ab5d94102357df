"""`t2i submit`: run any `t2i` command on a cluster through the Ray Jobs API.

    t2i submit --address http://127.0.0.1:8265 -- train --config jobs/configs/dalle_digits.yaml
    t2i submit --address http://HEAD:8265 --no-wait -- preprocess --config ...

The working directory (this checkout, minus .venv, runs/ and caches) is uploaded as the job's
runtime env, so the cluster runs the code you have. Token auth stays on: the client presents
`~/.ray/auth_token` (RAY_AUTH_MODE=token). Credentials are never forwarded by this command: give
the cluster its own (instance roles, secrets), not your shell's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time

EXCLUDES = [".venv/", "runs/", ".cache/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/"]
# Non-secret settings worth carrying to the job; never AWS_* credentials.
AGENT_WAIT_S = 60.0
FORWARD_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


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
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cmd = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if not cmd:
        raise ValueError("nothing to submit: give a t2i command after --, e.g. -- train --config X")
    if not args.address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
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

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"submit: job {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["submit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
