"""`t2i data`: build the bundled datasets.

t2i data digits --out DIR_OR_S3 [--config CFG] [image_size=64 mismatch_fraction=0.1 ...]
python -m jobs.data digits --out DIR_OR_S3      # same, without the console script
"""

from __future__ import annotations

import argparse

from data_pipeline.config import load_config
from data_pipeline.digits import DigitsConfig
from jobs.cli import run_module


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="build the bundled datasets as WebDataset shards",
        description="Build the bundled real datasets as WebDataset shards (local dir or s3://).",
    )
    kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    digits = kinds.add_parser(
        "digits",
        help="scikit-learn's 1797 handwritten digits with captions (+ real photo crops)",
        description=(
            "Write scikit-learn's bundled handwritten digits as captioned WebDataset shards "
            "(train/ and val/ splits, white ink on black, upscaled), a few real photo crops "
            "from scikit-image (photos/), and manifest.json. Options are DigitsConfig fields: "
            "image_size, val_fraction, samples_per_shard, mismatch_fraction, seed, photos, "
            "photo_size, storage.endpoint_url, storage.region."
        ),
    )
    digits.add_argument("--out", help="output directory or s3://bucket/prefix (sets `out`)")
    digits.add_argument("--config", metavar="CFG", help="optional YAML file of DigitsConfig values")
    digits.add_argument("overrides", nargs="*", metavar="key=value", help="override a value")
    digits.set_defaults(func=run_digits)


def run_digits(args: argparse.Namespace) -> int:
    from data_pipeline.digits import build_digits

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_config(DigitsConfig, args.config, overrides)
    manifest = build_digits(cfg)
    counts = ", ".join(f"{k}={v['samples']}" for k, v in manifest["splits"].items())
    print(f"data: done ({counts}) -> {cfg.out}")
    return 0


if __name__ == "__main__":
    run_module("data")
