"""`t2i eval`: judge a `t2i sample` output on the digits data (accuracy, diversity, CLIP, PSNR).

t2i eval --config jobs/configs/eval_digits.yaml [samples=DIR digits=DIR ...]
python -m jobs.eval --config CFG [key.sub=value ...]    # same; usable with `ray job submit`
"""

from __future__ import annotations

import argparse

from jobs.cli import add_config_arguments, load_job_config, run_module
from trainer.evaluate import EvalConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score samples: digit accuracy, diversity, CLIP score, tokenizer PSNR",
        description=(
            "Judge the images of a `t2i sample` output (`samples`) with a CNN trained on the real "
            "training digits of `digits` (cached; its val accuracy is reported): accuracy per "
            "digit and by prompt template, diversity against real digits, mean CLIP score, and "
            "the PSNR of `image_tokenizer` on held-out images. Writes eval.json to `output` "
            "(default <samples>/eval). Runs as one Ray task."
        ),
    )
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.common import init_ray
    from trainer.evaluate import EVAL_FILE, eval_on_ray, format_table

    cfg = load_job_config(EvalConfig, args)
    print(f"eval: samples={cfg.samples} digits={cfg.digits}")
    init_ray(cfg.ray, min_cpus=cfg.num_cpus)
    doc = eval_on_ray(cfg)
    print(format_table(doc))
    print(f"eval: {cfg.output_dir.rstrip('/')}/{EVAL_FILE}")
    return 0


if __name__ == "__main__":
    run_module("eval")
