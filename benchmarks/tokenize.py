"""Throughput of `t2i tokenize` (AR recipe) against the image tokenizer alone, and how its time
scales with the data, in one run on the same images.

    .venv/bin/python -m benchmarks.tokenize [--images 1024] [--n-hid 64] [--threads 1]

1. plan: the full Ray Data plan (read + decode/resize on CPU tasks + BPE + dVAE encode on the
   actor pool + part commits + shard writer + manifest), end to end, including BPE training and
   the actor's model load: samples / wall second.
2. model: the same dVAE forward passes (same batch size, padding and threads as the actor) timed
   alone on already-decoded pixels: the ceiling the plan can reach (goal: plan >= 0.9x).
3. scale: the plan on twice the images; goal: time(2x) / time(1x) <= 2.1.

Weights are random (a freshly initialised dVAE; speed does not depend on them). The last line
printed is `ratio_vs_model=<float> scale_2x_ratio=<float> samples_per_s=<float>`.

--real: recipe=ldm on real photos at real sizes (256-768 px JPEGs in img2dataset's layout,
`--images` of them and 4x as many; see benchmarks/real_data.py) at 256 px, through an SD-shaped
f8 4-channel KL autoencoder (block widths 128/256/512/512, 2 ResNet blocks per level) and
ViT-B-32's text tower (77 tokens, width 512), random weights; the plan at 1x and 4x against the
two models alone; the last line is `ratio_vs_model= scale_4x_time= driver_peak_gib=
object_store_peak_gib=`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# This file's name shadows the standard library's `tokenize` (which `inspect` and `linecache`
# import): replace the script directory on sys.path with the repository root.
sys.path[0] = str(Path(__file__).resolve().parents[1])

PER_SHARD = 128


def build_inputs(root: Path, images: int) -> list[str]:
    """Digits train shards, repeated (under new keys) until there are `images` samples."""
    from data_pipeline import fs
    from data_pipeline.digits import DigitsConfig, build_digits
    from data_pipeline.shards import iter_tar_samples, write_shards

    build_digits(DigitsConfig(out=str(root / "digits"), photos=0, samples_per_shard=PER_SHARD),
                 log=lambda *_: None)  # fmt: skip
    base = [s for p in sorted((root / "digits" / "train").glob("*.tar"))
            for s in iter_tar_samples(p.read_bytes())]  # fmt: skip
    samples = [(f"r{i:07d}", base[i % len(base)][1]) for i in range(images)]
    out = root / f"shards-{images}"
    write_shards(fs.resolve(str(out)), samples, samples_per_shard=PER_SHARD)
    return sorted(str(p) for p in out.glob("*.tar"))


def build_tokenizer(root: Path, n_hid: int) -> str:
    import torch
    from safetensors.torch import save_file

    from data_pipeline.config import to_yaml
    from trainer.config import TrainConfig
    from trainer.models.dvae import DvaeConfig, DvaeTokenizer

    torch.manual_seed(0)
    cfg = DvaeConfig(image_size=32, group_count=3, n_hid=n_hid, n_blk_per_group=1, vocab_size=512)
    out = root / "dvae"
    out.mkdir(exist_ok=True)
    save_file(DvaeTokenizer(cfg).state_dict(), str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(TrainConfig(name="bench", objective="dvae", dvae=cfg)))
    return str(out)


def run_plan(shards, out, tokenizer, batch_size, threads) -> tuple[float, int]:
    from data_pipeline.config import load_config
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize

    cfg = load_config(TokenizeConfig, None, [
        f"input={shards}", f"output={out}", "image_size=32", f"image_tokenizer.path={tokenizer}",
        f"image_tokenizer.batch_size={batch_size}", f"image_tokenizer.num_cpus={threads}",
        "text_tokenizer.vocab_size=1024", "text_tokenizer.text_len=16",
    ])  # fmt: skip
    t0 = time.perf_counter()
    manifest = run_tokenize(cfg, log=lambda *_: None)
    return time.perf_counter() - t0, manifest["rows"]


def run_model_alone(shards, tokenizer, batch_size, threads) -> tuple[float, int]:
    """The actor's forward passes, on pixels decoded beforehand (not timed)."""
    import numpy as np

    from data_pipeline import columns as C
    from data_pipeline.tokenize.stages import DecodeSquare, EncodeImages, ImageEncoderSpec
    from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows

    limits = ReaderLimits(1 << 26, 4096, ["png", "jpg"], ["txt"], ["pkl"])
    rows = [r for s in shards for r in read_shard_rows(s, limits)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in (C.KEY, C.IMAGE)}
    batch[C.REASON] = np.array([""] * len(rows))
    batch[C.DETAIL] = np.array([""] * len(rows))
    pixels = DecodeSquare(32, 10**8)(batch)[C.PIXELS]
    stage = EncodeImages(ImageEncoderSpec(tokenizer, None, batch_size, threads))
    stage.encode(pixels[:batch_size])  # warm-up, as the actor's first batch is in the plan
    t0 = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        stage.encode(pixels[start : start + batch_size])
    return time.perf_counter() - t0, len(pixels)


def build_sd_vae(root: Path) -> str:
    """A freshly initialised KL autoencoder of Stable Diffusion's VAE shape, as a `t2i train`
    export (model.safetensors with its scaling factor + config.yaml)."""
    import torch
    from safetensors.torch import save_file

    from data_pipeline.config import to_yaml
    from trainer.config import TrainConfig
    from trainer.models.klae import SCALE_KEY, KlaeConfig, KlaeTokenizer

    torch.manual_seed(0)
    cfg = KlaeConfig(image_size=256, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                     latent_channels=4, norm_num_groups=32)  # fmt: skip
    out = root / "sd-vae"
    out.mkdir(exist_ok=True)
    state = {k: v.contiguous() for k, v in KlaeTokenizer(cfg).state_dict().items()}
    save_file({**state, SCALE_KEY: torch.tensor(0.18215)}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(TrainConfig(name="sd-vae", objective="klae",
                                                         klae=cfg)))  # fmt: skip
    return str(out)


def run_real(args) -> None:
    """The --real mode (module docstring)."""
    import numpy as np
    import ray

    from benchmarks.real_data import build_real, last_line, timed
    from data_pipeline import columns as C
    from data_pipeline.config import load_config
    from data_pipeline.text_tokens import TextTokenizer
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize
    from data_pipeline.tokenize.stages import (
        DecodeSquare,
        EmbedText,
        EncodeImages,
        ImageEncoderSpec,
        TextEncoderSpec,
    )
    from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows

    bs, threads = args.batch_size, args.threads

    def plan(shards, out, vae):
        cfg = load_config(TokenizeConfig, None, [
            f"input={shards}", f"output={out}", "recipe=ldm", "image_size=256",
            "text_tokenizer.kind=open_clip", "text_tokenizer.text_len=77",
            f"image_tokenizer.path={vae}", f"image_tokenizer.batch_size={bs}",
            f"image_tokenizer.num_cpus={threads}", "text_encoder.model=ViT-B-32",
            f"text_encoder.batch_size={bs}", "text_encoder.num_cpus=1",
            "text_encoder.allow_random=true",
        ])  # fmt: skip
        return run_tokenize(cfg, log=lambda *_: None)["rows"]

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        vae = build_sd_vae(root)
        small, large = build_real(root, args.images)
        # Logical CPUs: the VAE actor's threads + the text encoder's 1 + 1 for decode tasks.
        ray.init(num_cpus=threads + 2, include_dashboard=False, logging_level="error")
        t1, n1, mem1 = timed(plan, small, root / "out1", vae)
        print(f"plan 1x: {n1} samples in {t1:.1f}s = {n1 / t1:.2f} samples/s", flush=True)
        t4, n4, mem4 = timed(plan, large, root / "out4", vae)
        print(f"plan 4x: {n4} samples in {t4:.1f}s = {n4 / t4:.2f} samples/s", flush=True)
        ray.shutdown()
        rows = [r for s in small for r in read_shard_rows(s, ReaderLimits.of())]
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in (C.KEY, C.IMAGE)}
        batch[C.REASON] = np.array([""] * len(rows))
        batch[C.DETAIL] = np.array([""] * len(rows))
        pixels = DecodeSquare(256, 10**8)(batch)[C.PIXELS]
        ids = TextTokenizer.open_clip(77).encode([r[C.CAPTION] for r in rows])
        images = EncodeImages(ImageEncoderSpec(vae, None, bs, threads))
        text = EmbedText(TextEncoderSpec(model="ViT-B-32", model_config=None, checkpoint="",
                                         batch_size=bs, threads=1))  # fmt: skip
        images.encode(pixels[:bs])  # warm-up, as the actors' first batches are in the plan
        text.encode(ids[:bs])
        runs = []  # the machine is shared: timed twice, the faster kept
        for _ in range(2):
            t0 = time.perf_counter()
            for s in range(0, len(pixels), bs):
                images.encode(pixels[s : s + bs])
                text.encode(ids[s : s + bs])
            runs.append(len(pixels) / (time.perf_counter() - t0))
        model = max(runs)
        print(f"models: {len(pixels)} samples = {model:.2f} samples/s (runs: "
              f"{', '.join(f'{r:.2f}' for r in runs)})", flush=True)  # fmt: skip
    print(last_line((n4 / t4) / model, t1, t4, mem1, mem4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--n-hid", type=int, default=64, help="dVAE width (model cost per image)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model actor")
    p.add_argument("--real", action="store_true", help="real photos, ldm, 1x and 4x (docstring)")
    args = p.parse_args()
    if args.real:
        return run_real(args)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tokenizer = build_tokenizer(root, args.n_hid)
        small, large = build_inputs(root, args.images), build_inputs(root, 2 * args.images)
        t_model, n_model = run_model_alone(small, tokenizer, args.batch_size, args.threads)
        model = n_model / t_model
        print(f"model: {n_model} samples in {t_model:.1f}s = {model:.1f} samples/s", flush=True)
        t1, n1 = run_plan(small, root / "out1", tokenizer, args.batch_size, args.threads)
        plan = n1 / t1
        print(f"plan:  {n1} samples in {t1:.1f}s = {plan:.1f} samples/s", flush=True)
        t2, n2 = run_plan(large, root / "out2", tokenizer, args.batch_size, args.threads)
        print(f"plan 2x: {n2} samples in {t2:.1f}s", flush=True)
    ray.shutdown()
    print(
        f"ratio_vs_model={plan / model:.3f} scale_2x_ratio={t2 / t1:.3f} samples_per_s={plan:.2f}"
    )


if __name__ == "__main__":
    main()
