"""`t2i`: one entry point, one subcommand per stage of the flow.

Each subcommand lives in its own `jobs/<name>.py` exposing `register(subparsers)`; the module list
below is the whole CLI surface. Ray, DeepSpeed and the data stages are imported inside each
command's `run`, so `--help` and config errors answer in about two seconds (the typed config imports
torch through the model config dataclasses).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, TypeVar

from data_pipeline.config import ConfigError, load_config

T = TypeVar("T")

# Modules that register subcommands, in the order `t2i --help` lists them (the order of the flow).
COMMAND_MODULES = (
    "jobs.data",
    "jobs.preprocess",
    "jobs.tokenize",
    "jobs.train",
    "jobs.sample",
    "jobs.eval",
    "jobs.convert",
    "jobs.submit",
)

DESCRIPTION = """\
Train text-to-image models at cluster scale on Ray.

flow:  t2i data digits -> t2i preprocess -> t2i tokenize -> t2i train -> t2i sample / t2i eval

Commands that use Ray start a local in-process instance by default; pass --address (or set
RAY_ADDRESS) to use a running cluster. Config files are YAML; any value can be overridden on the
command line as key.sub=value.
"""


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The shared `--config CFG [key.sub=value ...] [--address ADDR]` arguments of a command
    whose config has a `ray:` section (read them with `load_job_config`)."""
    parser.add_argument(
        "--config", required=required, metavar="CFG", help="YAML config file (see jobs/configs/)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override any config value"
    )
    parser.add_argument(
        "--address", help="Ray cluster address (sets ray.address; default: $RAY_ADDRESS or local)"
    )


def load_job_config(schema: type[T], args: argparse.Namespace) -> T:
    """The command's typed config: the `--config` file, then the overrides, then `--address`."""
    address = [f"ray.address={args.address}"] if args.address else []
    return load_config(schema, args.config, [*args.overrides, *address])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2i", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # User errors (bad config, bad path, bad data) get one clear line, not a traceback.
        print(f"t2i {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 130


def run_module(command: str) -> NoReturn:
    """`python -m jobs.<module> ARGS` (no console script needed): exits as `t2i <command> ARGS`."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
