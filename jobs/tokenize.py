"""`t2i tokenize`: clean shards -> token dataset (ar: BPE + dVAE/VQGAN codes) or latent dataset
(ldm: KL-AE latents + text-encoder states), with Ray Data actor pools.

t2i tokenize --config jobs/configs/tokenize_digits.yaml [key.sub=value ...] [--address ADDR]
python -m jobs.tokenize --config CFG [key.sub=value ...]   # same, without the console script

A rerun with the same config resumes: committed shards are skipped and the output comes out
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse

from jobs.cli import add_config_arguments, load_job_config, run_module


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="clean shards -> token / latent dataset (Parquet + manifest)",
        description=(
            "Stream clean WebDataset shards (local or s3://) through CPU decode and text BPE and "
            "model actor pools (image tokenizer; for recipe=ldm also an open_clip text encoder); "
            "write Parquet shards, the text tokenizer and manifest.json (last). Options are "
            "TokenizeConfig fields (input, output, recipe, image_size, rows_per_shard, "
            "text_tokenizer.*, image_tokenizer.*, text_encoder.*, storage.*, ray.*)."
        ),
    )
    add_config_arguments(p, required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize
    from jobs.common import init_ray, print_left_out

    cfg = load_job_config(TokenizeConfig, args)
    init_ray(cfg.ray)
    manifest = run_tokenize(cfg)
    once = manifest["exactly_once"]
    print(f"tokenize: {once['rows']} row(s) of {once['rows_in']} ({once['quarantined']} "
          f"quarantined) in {len(manifest['shards'])} file(s)")  # fmt: skip
    print_left_out("tokenize", manifest["quarantine"]["reasons"], cfg.output)
    return 0


if __name__ == "__main__":
    run_module("tokenize")
