"""Throughput of `t2i preprocess` against the model alone and against a naive loop, in one run on
the same images.

    .venv/bin/python -m benchmarks.preprocess [--model ViT-B-32] [--images 768]

1. plan: the full Ray Data plan (read + validate + decode/resize on CPU tasks + filters + CLIP on
   the actor pool + threshold + commit + clean-shard writer + stats), dedup off, end to end,
   including the actor's model load: samples / wall second.
2. model: the same CLIP forward passes (same batches, batch size and threads as the actor) timed
   alone on already-decoded pixels: the ceiling the plan can reach (goal: plan >= 0.9x).
3. naive: what a user would write first: `webdataset` decoding to PIL, open_clip's preprocess,
   one sample per forward pass, in one process (goal: plan >= 2x).

Weights are random (no downloads); speed does not depend on them. The last line printed is
`ratio_vs_model=<float> ratio_vs_naive=<float> samples_per_s=<float>`.

--real: real photos at real sizes (256-768 px JPEGs in img2dataset's layout, `--images` of them
and 4x as many; see benchmarks/real_data.py), ViT-B-32 with random weights, the plan at 1x and
4x against the model alone; the last line is `ratio_vs_model= scale_4x_time= driver_peak_gib=
object_store_peak_gib=` (benchmarks/real_data.py says what each means).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_inputs(root: Path, images: int) -> list[str]:
    from data_pipeline.digits import DigitsConfig, build_digits

    cfg = DigitsConfig(out=str(root / "digits"), photos=0, samples_per_shard=128,
                       mismatch_fraction=0.1)  # fmt: skip
    build_digits(cfg, log=lambda *_: None)
    shards = sorted(str(p) for p in (root / "digits" / "train").glob("*.tar"))
    return shards[: max(1, images // 128)]


def run_real(args) -> None:
    """The --real mode (module docstring)."""
    import numpy as np
    import ray
    from PIL import Image

    from benchmarks.real_data import build_real, last_line, timed
    from data_pipeline.clip_score import ClipScorer, ClipSpec, clip_image_size
    from data_pipeline.validate import decode_image, resize_center_crop
    from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows

    def model_alone(scorer, pixels, captions) -> float:
        scorer.encode(pixels[: args.batch_size], captions[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(captions), args.batch_size):
            scorer.encode(pixels[s : s + args.batch_size], captions[s : s + args.batch_size])
        return len(captions) / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        small, large = build_real(root, args.images)
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        t1, (_, n1), mem1 = timed(run_plan, small, root / "out1", args.model, args.batch_size,
                                  args.threads, jpeg=True)  # fmt: skip
        print(f"plan 1x: {n1} samples in {t1:.1f}s = {n1 / t1:.2f} samples/s", flush=True)
        t4, (_, n4), mem4 = timed(run_plan, large, root / "out4", args.model, args.batch_size,
                                  args.threads, jpeg=True)  # fmt: skip
        print(f"plan 4x: {n4} samples in {t4:.1f}s = {n4 / t4:.2f} samples/s", flush=True)
        ray.shutdown()
        spec = ClipSpec(args.model, None, "", args.batch_size, args.threads)
        size = clip_image_size(spec)
        rows = [r for s in small for r in read_shard_rows(s, ReaderLimits.of())]
        pixels = np.stack([resize_center_crop(Image.fromarray(decode_image(r["image"], 10**8)[0]),
                                              size) for r in rows])  # fmt: skip
        captions = [r["caption"] for r in rows]
        scorer = ClipScorer(spec)
        # The machine is shared: the model alone is timed twice, the faster kept (the ceiling
        # the plan is compared with).
        runs = [model_alone(scorer, pixels, captions) for _ in range(2)]
        model = max(runs)
        print(f"model: {len(captions)} samples = {model:.2f} samples/s (runs: "
              f"{', '.join(f'{r:.2f}' for r in runs)})", flush=True)  # fmt: skip
    print(last_line((n4 / t4) / model, t1, t4, mem1, mem4))


def run_plan(shards, out, model, batch_size, threads, jpeg=False) -> tuple[float, int]:
    from data_pipeline.config import load_config
    from data_pipeline.preprocess.config import PreprocessConfig
    from data_pipeline.preprocess.job import run_preprocess

    cfg = load_config(
        PreprocessConfig,
        None,
        [
            f"input={shards}",
            f"output={out}",
            f"clip.model={model}",
            "clip.threshold=-1.0",
            f"clip.batch_size={batch_size}",
            f"clip.num_cpus={threads}",
            "clip.concurrency=1",
            "dedup.exact=false",
            "dedup.near=false",
            *(["filters.min_side=64"] if jpeg else []),  # real photos: a filter that runs
        ],
    )
    t0 = time.perf_counter()
    manifest = run_preprocess(cfg, log=lambda *_: None)
    return time.perf_counter() - t0, manifest["rows_in"]


def decoded(shards, size):
    from PIL import Image

    from data_pipeline.shards import iter_tar_samples
    from data_pipeline.validate import decode_image, resize_center_crop

    pixels, captions = [], []
    for s in shards:
        for _, m in iter_tar_samples(Path(s).read_bytes()):
            rgb, _, _ = decode_image(m["png"], 10**8)
            pixels.append(resize_center_crop(Image.fromarray(rgb), size))
            captions.append(m["txt"].decode())
    return pixels, captions


def run_model_alone(shards, model, batch_size, threads) -> tuple[float, int]:
    import numpy as np

    from data_pipeline.clip_score import ClipScorer, ClipSpec, clip_image_size

    spec = ClipSpec(model, None, "", batch_size, threads)
    pixels, captions = decoded(shards, clip_image_size(spec))
    scorer = ClipScorer(spec)
    pixels = np.stack(pixels)
    t0 = time.perf_counter()
    for s in range(0, len(captions), batch_size):
        img, txt = scorer.encode(pixels[s : s + batch_size], captions[s : s + batch_size])
        _ = (img * txt).sum(1)
    return time.perf_counter() - t0, len(captions)


def run_naive(shards, model_name, threads) -> tuple[float, int]:
    import open_clip
    import torch
    import webdataset as wds

    torch.set_num_threads(threads)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    n = 0
    t0 = time.perf_counter()
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil")
    with torch.inference_mode():
        for sample in ds.to_tuple("png", "txt"):
            img, txt = sample
            i = model.encode_image(preprocess(img).unsqueeze(0), normalize=True)
            t = model.encode_text(tokenizer([txt]), normalize=True)
            _ = float((i * t).sum())
            n += 1
    return time.perf_counter() - t0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--real", action="store_true", help="real photos, 1x and 4x (docstring)")
    args = p.parse_args()
    if args.real:
        return run_real(args)

    import ray

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shards = build_inputs(root, args.images)
        # One extra logical CPU: decode tasks run beside the actor, which holds `threads` cores.
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        t_plan, n_plan = run_plan(shards, root / "out", args.model, args.batch_size, args.threads)
        ray.shutdown()
        plan = n_plan / t_plan
        print(f"plan:  {n_plan} samples in {t_plan:.1f}s = {plan:.2f} samples/s", flush=True)
        t_model, n_model = run_model_alone(shards, args.model, args.batch_size, args.threads)
        model = n_model / t_model
        print(f"model: {n_model} samples in {t_model:.1f}s = {model:.2f} samples/s", flush=True)
        t_naive, n_naive = run_naive(shards, args.model, args.threads)
        naive = n_naive / t_naive
        print(f"naive: {n_naive} samples in {t_naive:.1f}s = {naive:.2f} samples/s", flush=True)
    print(
        f"ratio_vs_model={plan / model:.3f} ratio_vs_naive={plan / naive:.3f} samples_per_s={plan:.3f}"
    )


if __name__ == "__main__":
    main()
