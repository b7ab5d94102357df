"""`make demo`: both recipes end to end on the embedded default (local Ray, bundled real data).

    shared:  data digits (10% wrong captions) -> train CLIP (t2i train, objective=clip)
             -> preprocess (validate, filter by CLIP score, dedup) -> filter precision/recall
    ar:      train the dVAE (objective=dvae) -> tokenize (BPE + dVAE codes)
             -> train the DALL-E transformer (objective=dalle) -> sample (KV cache, CLIP rerank)
    ldm:     train the KL autoencoder (objective=klae) -> tokenize (latents + CLIP text states)
             -> train the U-Net (objective=ldm) -> sample (DDIM + guidance, CLIP rerank)
    each:    eval: digit accuracy on training and held-out prompt phrasings, diversity vs real
             digits, CLIP score; then one table for both recipes with wall time per stage.

`--recipe ar|ldm` runs one recipe (after the shared stages). Every stage writes under one run
directory and is skipped when its output is already complete, so a second `make demo` reuses
finished work.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from data_pipeline import fs
from data_pipeline.shards import iter_tar_samples

CONFIGS = Path(__file__).resolve().parent / "configs"
RECIPES = ("ar", "ldm")


def stage(name: str, done, build, seconds: dict[str, float | None] | None = None):
    """Run `build()` unless `done()` returns a finished result; record its wall time in
    `seconds[name]` (None: reused)."""
    result = done()
    if result is not None:
        print(f"[demo] {name}: reusing finished output", flush=True)
        if seconds is not None:
            seconds[name] = None
        return result
    print(f"[demo] {name}: running", flush=True)
    t0 = time.monotonic()
    result = build()
    took = time.monotonic() - t0
    print(f"[demo] {name}: done in {took:.0f}s", flush=True)
    if seconds is not None:
        seconds[name] = took
    return result


def read_split(shards_dir: Path) -> list[tuple[str, bytes, str, bool]]:
    """(key, png, caption, mismatched) for every sample of a digits split, in shard order."""
    rows = []
    for shard in sorted(shards_dir.glob("*.tar")):
        for key, m in iter_tar_samples(shard.read_bytes()):
            meta = json.loads(m["json"])
            rows.append((key, m["png"], m["txt"].decode(), bool(meta["mismatched"])))
    return rows


def calibrate_threshold(spec, val_dir: Path) -> tuple[float, float]:
    """The CLIP threshold with the best F1 at flagging the held-out split's wrong captions
    (a labelled calibration set, never the split the filter is then judged on)."""
    from PIL import Image

    from data_pipeline.clip_score import ClipScorer, clip_image_size

    rows = read_split(val_dir)
    size = clip_image_size(spec)
    pixels = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((size, size)))
            for _, png, _, _ in rows
        ]
    )
    scorer = ClipScorer(spec)
    scores = []
    for s in range(0, len(rows), spec.batch_size):
        img, txt = scorer.encode(
            pixels[s : s + spec.batch_size], [r[2] for r in rows[s : s + spec.batch_size]]
        )
        scores.append((img * txt).sum(1))
    scores = np.concatenate(scores)
    bad = np.array([r[3] for r in rows])
    best = (0.0, float(scores.min()))
    for t in np.unique(scores):
        flagged = scores < t
        tp = (flagged & bad).sum()
        f1 = 2 * tp / max(flagged.sum() + bad.sum(), 1)
        best = max(best, (float(f1), float(t)))
    return best[1], best[0]


def filter_report(preprocessed: Path, truth: dict[str, bool]) -> tuple[float, float, int]:
    """Precision and recall of the CLIP filter's removals against the injected mismatches."""
    import pyarrow.parquet as pq

    from data_pipeline import columns as C

    removed = set()
    for part in sorted((preprocessed / "quarantine").glob("*.parquet")):
        t = pq.read_table(part, columns=[C.KEY, C.REASON]).to_pydict()
        removed |= {k for k, r in zip(t[C.KEY], t[C.REASON], strict=True) if r == C.LOW_CLIP_SCORE}
    wrong = {k for k, bad in truth.items() if bad}
    hit = len(removed & wrong)
    return hit / max(len(removed), 1), hit / max(len(wrong), 1), len(wrong)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo", help="everything the demo writes")
    parser.add_argument(
        "--recipe",
        choices=[*RECIPES, "both"],
        default="both",
        help="ar: DALL-E over dVAE codes; ldm: latent diffusion; both (default)",
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    t_start = time.monotonic()

    from data_pipeline.config import load_config
    from data_pipeline.digits import MANIFEST_FORMAT, MANIFEST_VERSION, DigitsConfig, build_digits
    from data_pipeline.manifest import ManifestError, read_manifest
    from data_pipeline.preprocess.config import PreprocessConfig
    from jobs.common import init_ray

    def manifest_of(path: Path, fmt: str, version: int):
        try:
            return read_manifest(fs.resolve(str(path)), fmt, (version,))
        except ManifestError:
            return None

    # 1. Data: 10% of captions name the wrong digit; the CLIP filter must find them.
    digits_dir = run_dir / "digits"
    digits_cfg = DigitsConfig(out=str(digits_dir), mismatch_fraction=0.1)
    manifest = stage(
        "data digits",
        lambda: manifest_of(digits_dir, MANIFEST_FORMAT, MANIFEST_VERSION),
        lambda: build_digits(digits_cfg),
    )
    for split, info in manifest["splits"].items():
        print(f"[demo]   {split:7s} {info['samples']:5d} samples in {len(info['shards'])} shard(s)")

    # 2. CLIP, trained by the one engine (objective=clip). A filter model must not have learned
    # the noise it is meant to find (LAION filtered with OpenAI's CLIP, trained elsewhere): it
    # stands in for a pretrained CLIP by training on a separately built, correctly captioned copy.
    clean_dir = run_dir / "digits_clean"
    clean_cfg = DigitsConfig(out=str(clean_dir), mismatch_fraction=0.0, photos=0)
    stage(
        "data digits (correct captions, for CLIP)",
        lambda: manifest_of(clean_dir, MANIFEST_FORMAT, MANIFEST_VERSION),
        lambda: build_digits(clean_cfg),
    )
    train_dir = run_dir / "train"
    clip_cfg = train_config(
        "clip_digits",
        clean_dir / "train",
        train_dir,
        f"clip.model_config={CONFIGS / 'clip_digits_tiny.json'}",
    )
    s = clip_cfg.scaling
    init_ray(clip_cfg.ray, min_cpus=s.num_workers * s.cpus_per_worker + 2)

    clip_ckpt = train_stage("train CLIP", clip_cfg, train_dir)
    clip_weights = Path(clip_ckpt.path) / "model.safetensors"

    # 3. Preprocess: validation + quarantine, filters, CLIP score, dedup -> clean shards.
    from data_pipeline.preprocess.job import MANIFEST_FORMAT as PRE_FMT
    from data_pipeline.preprocess.job import MANIFEST_VERSION as PRE_VER

    pre_dir = run_dir / "preprocessed"
    overrides = [
        f"input={digits_dir / 'train'}",
        f"output={pre_dir}",
        f"clip.checkpoint={clip_weights}",
        f"clip.model_config={CONFIGS / 'clip_digits_tiny.json'}",
    ]
    pre_cfg = load_config(PreprocessConfig, CONFIGS / "preprocess_digits.yaml", overrides)
    if manifest_of(pre_dir, PRE_FMT, PRE_VER) is None:
        # A tiny CLIP's cosine scale is its own: pick the threshold on the labelled val split.
        from data_pipeline.clip_score import ClipSpec

        spec = ClipSpec(
            pre_cfg.clip.model,
            pre_cfg.clip.load_model_config(),
            str(clip_weights),
            batch_size=pre_cfg.clip.batch_size,
            threads=2,
        )
        threshold, f1 = calibrate_threshold(spec, digits_dir / "val")
        print(
            f"[demo] calibrated the CLIP threshold on the val split: {threshold:.3f} (F1 {f1:.2f})"
        )
        overrides.append(f"clip.threshold={threshold:.4f}")
        pre_cfg = load_config(PreprocessConfig, CONFIGS / "preprocess_digits.yaml", overrides)

    def preprocess():
        from data_pipeline.preprocess.job import run_preprocess

        return run_preprocess(pre_cfg)

    pre = stage("preprocess", lambda: manifest_of(pre_dir, PRE_FMT, PRE_VER), preprocess)
    print(f"[demo]   kept {pre['samples']} of {pre['rows_in']} samples; removed by reason:")
    for reason, count in sorted(pre["reasons"].items()):
        print(f"[demo]     {reason:<20} {count}")
    truth = {key: bad for key, _, _, bad in read_split(digits_dir / "train")}
    precision, recall, n_wrong = filter_report(pre_dir, truth)
    threshold = pre["config"]["clip"]["threshold"]
    print(
        f"[demo]   CLIP filter vs the {n_wrong} injected wrong captions in train: "
        f"precision {precision:.2f}, recall {recall:.2f} (threshold {threshold:.3f})"
    )
    print(f"[demo]   clean shards, quarantine table, stats.json, clip_scores.png: {pre_dir}")
    clean_shards = pre_dir / "shards"

    ctx = Shared(run_dir, digits_dir, train_dir, clean_shards, clip_weights)
    recipes = RECIPES if args.recipe == "both" else (args.recipe,)
    results = {r: (ar_recipe if r == "ar" else ldm_recipe)(ctx) for r in recipes}
    print(f"[demo] filter: precision {precision:.2f} / recall {recall:.2f} of the injected wrong "
          f"captions (threshold {threshold:.3f})")  # fmt: skip
    print("\n".join(f"[demo] {line}" for line in summary_table(results).splitlines()))
    for r, res in results.items():
        print(f"[demo] {r} sample grid: {res['grid']}")
    print(f"[demo] total {time.monotonic() - t_start:.0f}s")
    return 0


class Shared:
    """What both recipes start from: the run layout, the digits, clean shards and the CLIP."""

    def __init__(self, run_dir: Path, digits_dir: Path, train_dir: Path, clean_shards: Path,
                 clip_weights: Path):  # fmt: skip
        self.run_dir, self.digits_dir, self.train_dir = run_dir, digits_dir, train_dir
        self.clean_shards, self.clip_weights = clean_shards, clip_weights

    def clip_overrides(self) -> list[str]:
        return [f"clip.checkpoint={self.clip_weights}",
                f"clip.model_config={CONFIGS / 'clip_digits_tiny.json'}"]  # fmt: skip

    def train(self, name: str, config: str, data: Path, seconds: dict):
        """`train_stage` of jobs/configs/<config>.yaml reading `data`."""
        cfg = train_config(config, data, self.train_dir)
        return train_stage(name, cfg, self.train_dir, seconds)

    def tokenize(self, name: str, config: str, out: str, image_tok, seconds: dict,
                 *overrides: str) -> tuple[Path, dict]:  # fmt: skip
        """`tokenize_stage` of jobs/configs/<config> from the clean shards into run_dir/<out>,
        images through the tokenizer checkpoint `image_tok`: (the dataset dir, its manifest)."""
        out_dir = self.run_dir / out
        base = [f"input={self.clean_shards}", f"output={out_dir}",
                f"image_tokenizer.path={image_tok.path}"]  # fmt: skip
        return out_dir, tokenize_stage(name, CONFIGS / config, [*base, *overrides], seconds)


def ar_recipe(ctx: Shared) -> dict:
    """dVAE -> BPE + codes -> DALL-E -> sample -> eval."""
    seconds: dict[str, float | None] = {}
    dvae = ctx.train("train dVAE (image tokenizer)", "dvae_digits", ctx.clean_shards, seconds)
    tokens_dir, tokens = ctx.tokenize("tokenize (BPE text + dVAE codes)", "tokenize_digits.yaml",
                                      "tokens", dvae, seconds)  # fmt: skip
    print(f"[demo]   {tokens['rows']} rows, {tokens['image_grid']}x{tokens['image_grid']} codes "
          f"of {tokens['image_vocab']}: {tokens_dir}")  # fmt: skip
    dalle = ctx.train("train DALL-E", "dalle_digits", tokens_dir, seconds)
    return sample_and_eval(ctx, "ar", "sample_digits.yaml", dalle, tokens_dir, dvae, seconds)


def ldm_recipe(ctx: Shared) -> dict:
    """KL-AE -> latents + CLIP text states -> U-Net -> sample -> eval."""
    seconds: dict[str, float | None] = {}
    klae = ctx.train("train KL autoencoder", "klae_digits", ctx.clean_shards, seconds)
    latents_dir, latents = ctx.tokenize(
        "tokenize (KL-AE latents + CLIP text states)",
        "tokenize_digits_latent.yaml",
        "latents",
        klae,
        seconds,
        f"text_encoder.checkpoint={ctx.clip_weights}",
        f"text_encoder.model_config={CONFIGS / 'clip_digits_tiny.json'}",
    )
    print(f"[demo]   {latents['rows']} rows, latents {latents['latent_shape']}: {latents_dir}")
    ldm = ctx.train("train latent-diffusion U-Net", "ldm_digits", latents_dir, seconds)
    return sample_and_eval(ctx, "ldm", "sample_digits_ldm.yaml", ldm, latents_dir, klae, seconds)


def sample_and_eval(ctx: Shared, recipe: str, config: str, model, data: Path, image_tok,
                    seconds: dict) -> dict:  # fmt: skip
    """Sample every digit from training and held-out templates (CLIP keeps the best); eval."""
    from data_pipeline.config import load_config
    from trainer.evaluate import EvalConfig, eval_on_ray, format_table
    from trainer.sampling.config import SampleConfig
    from trainer.sampling.run import sample_on_ray

    suffix = "" if recipe == "ar" else f"_{recipe}"
    samples_dir = ctx.run_dir / f"samples{suffix}"
    sample_cfg = load_config(
        SampleConfig,
        CONFIGS / config,
        [f"model={model.path}", f"tokens={data}", f"image_tokenizer={image_tok.path}",
         f"output={samples_dir}", *ctx.clip_overrides()],
    )  # fmt: skip
    stage(
        f"sample ({recipe})",
        lambda: str(samples_dir) if (samples_dir / "samples.jsonl").exists() else None,
        lambda: sample_on_ray(sample_cfg),
        seconds,
    )
    eval_dir = ctx.run_dir / f"eval{suffix}"
    eval_cfg = load_config(
        EvalConfig,
        CONFIGS / "eval_digits.yaml",
        [f"samples={samples_dir}", f"digits={ctx.digits_dir}",
         f"image_tokenizer={image_tok.path}", f"output={eval_dir}"],
    )  # fmt: skip
    eval_file = eval_dir / "eval.json"
    doc = stage(
        f"eval ({recipe})",
        lambda: json.loads(eval_file.read_text()) if eval_file.exists() else None,
        lambda: eval_on_ray(eval_cfg),
        seconds,
    )
    print("\n".join(f"[demo]   {line}" for line in format_table(doc).splitlines()))
    return {"eval": doc, "seconds": seconds, "grid": samples_dir / "grid.png"}


def summary_table(results: dict[str, dict]) -> str:
    """One table for the recipes run: accuracy by phrasing, diversity vs real, CLIP score, and
    wall time per stage ("reused" for stages a previous run finished)."""
    lines = [
        "recipe  acc(train)  acc(held-out)  diversity gen/real (ratio)  CLIP score",
    ]
    for recipe, res in results.items():
        doc = res["eval"]
        bt, div = doc["accuracy"]["by_template"], doc["diversity"]
        ratio = div["generated"] / div["real"] if div["real"] else float("nan")
        lines.append(
            f"{recipe:<6}  {bt['train']:>10.3f}  {bt['heldout']:>13.3f}  "
            f"{div['generated']:>8.3f}/{div['real']:.3f} ({ratio:.2f})  "
            f"{doc['clip_score']['mean']:>10.4f}"
        )
    for recipe, res in results.items():
        times = ", ".join(
            f"{name} {'reused' if t is None else f'{t:.0f}s'}" for name, t in res["seconds"].items()
        )
        lines.append(f"{recipe} stages: {times}")
    return "\n".join(lines)


def train_config(name: str, data: Path, train_dir: Path, *overrides: str):
    """jobs/configs/<name>.yaml reading `data`, its run under `train_dir`."""
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig

    base = [f"data.path={data}", f"checkpoint.storage_path={train_dir}"]
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", [*base, *overrides])


def train_stage(name: str, cfg, train_dir: Path, seconds: dict | None = None):
    """`t2i train` for `cfg` unless its run already has a complete final checkpoint; returns the
    location of that checkpoint (an exported, loadable model directory)."""
    from trainer import checkpoint as ck

    def done():
        found = ck.list_complete(fs.resolve(str(train_dir / cfg.name)))
        return found[0][1] if found and found[0][0] >= cfg.steps else None

    def train():
        from trainer.launch import fit

        result = fit(cfg)
        if result.error:
            raise result.error
        return done()

    return stage(name, done, train, seconds)


def tokenize_stage(
    name: str, config: Path, overrides: list[str], seconds: dict | None = None
) -> dict:
    """`t2i tokenize` (resumable; a complete output is reused); returns the dataset manifest."""
    from data_pipeline.config import load_config
    from data_pipeline.token_dataset import read_any_manifest
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize

    cfg = load_config(TokenizeConfig, config, overrides)
    out = fs.resolve(cfg.output)

    def done():
        return read_any_manifest(out) if fs.exists(out.join("manifest.json")) else None

    return stage(name, done, lambda: run_tokenize(cfg), seconds)


if __name__ == "__main__":
    sys.exit(main())
