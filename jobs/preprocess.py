"""`t2i preprocess`: validate, filter, score and deduplicate WebDataset shards with Ray Data.

t2i preprocess --config jobs/configs/preprocess_digits.yaml [key.sub=value ...]
python -m jobs.preprocess --config CFG [key.sub=value ...]   # same, without the console script

A rerun with the same config resumes: committed work is skipped and the outputs come out
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.preprocess.config import PreprocessConfig
from jobs.cli import add_config_arguments, load_job_config, run_module


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="raw shards -> validated, CLIP-filtered, deduplicated shards",
        description=(
            "Stream WebDataset shards (dir, glob or list; local or s3://) through per-sample "
            "validation and quarantine, size/aspect/caption filters, CLIP scoring on an actor "
            "pool and exact + near dedup; write clean shards, a quarantine table, stats.json, "
            "a CLIP-score histogram and manifest.json. Options are PreprocessConfig fields "
            "(input, output, max_bad_fraction, filters.*, clip.*, dedup.*, validate.*, "
            "storage.*, ray.*)."
        ),
    )
    add_config_arguments(p, required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.preprocess.job import PreprocessError, run_preprocess
    from jobs.common import init_ray, print_left_out

    cfg = load_job_config(PreprocessConfig, args)
    init_ray(cfg.ray)
    try:
        manifest = run_preprocess(cfg)
    except PreprocessError as e:
        print(f"t2i preprocess: failed: {e}", file=sys.stderr)
        return 1
    print(f"preprocess: kept {manifest['samples']} of {manifest['rows_in']} sample(s)")
    print_left_out("preprocess", manifest["reasons"], cfg.output)
    return 0


if __name__ == "__main__":
    run_module("preprocess")
