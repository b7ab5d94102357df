"""`t2i sample`: text prompts -> images from a trained model (either recipe), CLIP-reranked.

t2i sample --config jobs/configs/sample_digits.yaml [sample.prompts='["the number 7"]' ...]
python -m jobs.sample --config CFG [key.sub=value ...]    # same; usable with `ray job submit`
"""

from __future__ import annotations

import argparse

from jobs.cli import add_config_arguments, load_job_config, run_module
from trainer.sampling.config import SampleConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample images for text prompts (ar: KV cache, top-k/top-p; ldm: DDIM + CFG; CLIP rerank)",
        description=(
            "Sample sample.candidates images per prompt (sample.prompts or sample.prompts_file) "
            "from a trained model (recipe 'ar': DALL-E run `model`, text tokenizer of `tokens`, "
            "codes decoded by `image_tokenizer`), rerank them with the CLIP model in clip.*, and "
            "write the best sample.keep per prompt to `output` (local or s3://): images/*.png, "
            "samples.jsonl, grid.png. Candidates are sharded over sample.workers Ray actors "
            "(a GPU each when the cluster has GPUs)."
        ),
    )
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.common import init_ray
    from trainer.sampling.config import check_config
    from trainer.sampling.run import sample_on_ray

    cfg = load_job_config(SampleConfig, args)
    check_config(cfg)  # before Ray starts: config mistakes answer at once
    s = cfg.sample
    how = (
        f"temperature={s.temperature} top_k={s.top_k} top_p={s.top_p}"
        if cfg.recipe == "ar"
        else f"scheduler={s.scheduler} steps={s.steps} guidance={s.guidance} eta={s.eta}"
    )
    print(
        f"sample: recipe={cfg.recipe} model={cfg.model} candidates={s.candidates} keep={s.keep} "
        f"{how} seed={s.seed} workers={s.workers}"
    )
    init_ray(cfg.ray, min_cpus=cfg.num_cpus)
    summary = sample_on_ray(cfg)
    print(
        f"sample: {summary['images']} image(s) for {summary['prompts']} prompt(s) from "
        f"{summary['candidates']} candidates in {summary['sampling_seconds']:.1f}s"
    )
    if summary["mean_clip_score_kept"] is not None:
        print(
            f"sample: mean CLIP score {summary['mean_clip_score_kept']:.4f} kept, "
            f"{summary['mean_clip_score_all']:.4f} all candidates"
        )
    print(f"sample: output -> {summary['output']} (samples.jsonl, grid.png, images/)")
    return 0


if __name__ == "__main__":
    run_module("sample")
