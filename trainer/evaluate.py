"""`t2i eval`: how good are the samples of a `t2i sample` run on the digits data?

    t2i eval --config jobs/configs/eval_digits.yaml [samples=... digits=...]

Measured, and written to `<output>/eval.json` (format "ray-t2i/eval" v1) plus a printed table:

* accuracy: does the image show the digit the prompt asked for? Judged by a small CNN trained on
  the real training split (`trainer.digits_classifier`; its held-out val accuracy is reported so
  the judge itself can be trusted). Per digit, overall, and by prompt template: prompts built
  from `HELDOUT_TEMPLATES` (phrasings never in the training captions) are reported apart.
* diversity: mean pairwise pixel distance between the images of one prompt, averaged per digit,
  next to the same figure on real digits of that class. A model that emits one image per digit
  scores 0 against the real digits' > 0.
* mean CLIP score of the samples (from samples.jsonl, as the sampler's reranker scored them).
* tokenizer PSNR on held-out real images: the ceiling the image tokenizer puts on sample quality.

The expected digit of a prompt is parsed from its text (`prompt_digit`), so prompts written by
hand are judged as well as template-built ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import fs
from data_pipeline.config import REQUIRED, RayConfig, StorageConfig, from_dict
from data_pipeline.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption_for
from trainer.digits_classifier import ClassifierSection, load_digit_split, load_or_train, predict

FORMAT = "ray-t2i/eval"
VERSION = 1
EVAL_FILE = "eval.json"


@dataclass
class EvalConfig:
    """`t2i eval`: judge a `t2i sample` output against the real digits."""

    samples: str = REQUIRED  # a `t2i sample` output dir (samples.jsonl + images)
    digits: str = REQUIRED  # `t2i data digits` dir: judge training (train), references (val)
    image_tokenizer: str = ""  # tokenizer whose reconstruction PSNR is reported; "": skipped
    psnr_split: str = "val"  # split of `digits` (held-out) the PSNR is measured on
    psnr_images: int = 256  # at most this many images for the PSNR; 0: all
    output: str = ""  # eval dir (eval.json, cached classifier); "": <samples>/eval
    classifier: ClassifierSection = field(default_factory=ClassifierSection)
    num_cpus: float = 2.0  # the Ray task's CPUs (and torch threads)
    num_gpus: float = 0.0  # GPUs of the Ray task, requested as given (CPU is plenty)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def output_dir(self) -> str:
        return self.output or self.samples.rstrip("/") + "/eval"


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------

_TEMPLATE_PROMPTS = {
    caption_for(d, t).lower(): (d, kind)
    for kind, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES))
    for t in templates
    for d in range(10)
}


def prompt_digit(prompt: str) -> tuple[int | None, str]:
    """(digit the prompt asks for, template kind "train" | "heldout" | "other").

    A prompt built from a digits template is matched exactly; any other prompt names its digit
    when exactly one distinct digit appears in it (as a word or a numeral), else the digit is None.
    """
    text = " ".join(prompt.lower().split())
    if text in _TEMPLATE_PROMPTS:
        return _TEMPLATE_PROMPTS[text]
    found = {DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", text) if w in DIGIT_WORDS}
    found |= {int(n) for n in re.findall(r"(?<!\d)\d(?!\d)", text)}
    return (found.pop() if len(found) == 1 else None), "other"


def compute_diversity(images: np.ndarray) -> float | None:
    """Mean pairwise RMS pixel distance (grayscale, [0, 1]) of images (N, H, W, 3) uint8.

    0 for identical images; None for fewer than two.
    """
    if len(images) < 2:
        return None
    x = images.astype(np.float64).mean(axis=-1).reshape(len(images), -1) / 255.0  # (N, H*W)
    # Differences row by row, not the |a|²+|b|²-2ab Gram trick: that cancels to ~1e-8 instead of
    # 0 for identical images on some CPUs, and memory stays at one (N, H*W) block.
    rms = [np.sqrt(((x[i + 1 :] - x[i]) ** 2).mean(1)) for i in range(len(x) - 1)]
    return float(np.concatenate(rms).mean())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------------------------
# Reading the sample run
# --------------------------------------------------------------------------------------------


def read_samples(cfg: EvalConfig) -> tuple[list[dict], np.ndarray]:
    """(samples.jsonl rows, their images uint8 (N, H, W, 3)) of a `t2i sample` output."""
    from trainer.digits_classifier import decode_image
    from trainer.sampling.common import SAMPLES_FILE

    base = fs.resolve(cfg.samples, storage=cfg.storage)
    loc = base.join(SAMPLES_FILE)
    if not fs.exists(loc):
        raise FileNotFoundError(f"{loc.uri}: no {SAMPLES_FILE} (is samples a `t2i sample` dir?)")
    rows = []
    for n, line in enumerate(fs.read_bytes(loc).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{loc.uri}:{n}: not JSON: {e}") from e
        for key in ("prompt", "path", "rank"):
            if key not in row:
                raise ValueError(f"{loc.uri}:{n}: missing key {key!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{loc.uri}: no samples")
    images = [decode_image(fs.read_bytes(base.join(r["path"]))) for r in rows]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{base.uri}: samples have different sizes {sorted(shapes)}")
    return rows, np.stack(images)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def accuracy_report(labels: list[int | None], kinds: list[str], predicted: np.ndarray) -> dict:
    """Accuracy overall, per digit and per template kind over the labelled samples."""
    ok = [
        (lab, k, int(p) == lab)
        for lab, k, p in zip(labels, kinds, predicted, strict=True)
        if lab is not None
    ]
    per_digit = {str(d): _mean([float(hit) for lab, _, hit in ok if lab == d]) for d in range(10)}
    by_template = {
        kind: _mean([float(hit) for _, k, hit in ok if k == kind])
        for kind in ("train", "heldout", "other")
    }
    return {
        "overall": _mean([float(hit) for _, _, hit in ok]),
        "per_digit": per_digit,
        "by_template": by_template,
        "labelled": len(ok),
    }


def diversity_report(
    rows: list[dict],
    labels: list[int | None],
    images: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
) -> dict:
    """Per digit: generated (mean over its prompts of the within-prompt figure) vs real."""
    by_prompt: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_prompt.setdefault(row["prompt"], []).append(i)
    per_digit = {}
    for d in range(10):
        prompts = [ix for ix in by_prompt.values() if labels[ix[0]] == d]
        gen = _mean([compute_diversity(images[ix]) for ix in prompts])
        ref = compute_diversity(real[real_labels == d])
        per_digit[str(d)] = {
            "generated": gen,
            "real": ref,
            "ratio": gen / ref if gen is not None and ref else None,
        }
    gen_all = _mean([v["generated"] for v in per_digit.values()])
    real_all = _mean([v["real"] for v in per_digit.values() if v["generated"] is not None])
    return {
        "per_digit": per_digit,
        "generated": gen_all,
        "real": real_all,
        "ratio": gen_all / real_all if gen_all is not None and real_all else None,
    }


def tokenizer_report(cfg: EvalConfig, log=print) -> dict | None:
    """PSNR of the image tokenizer on held-out real images (None when not configured)."""
    if not cfg.image_tokenizer:
        return None
    from trainer.pretrained.image_tokenizers import load_image_tokenizer
    from trainer.recon import load_split_images, reconstruction_psnr

    tok = load_image_tokenizer(cfg.image_tokenizer, storage=cfg.storage)
    images = load_split_images(
        cfg.digits,
        cfg.psnr_split,
        multiple_of=tok.downsample,
        limit=cfg.psnr_images,
        storage=cfg.storage,
    )
    value = reconstruction_psnr(tok, images)
    log(f"eval: {tok.kind} PSNR on {len(images)} {cfg.psnr_split} images: {value:.2f} dB")
    return {
        "path": cfg.image_tokenizer,
        "kind": tok.kind,
        "fingerprint": tok.fingerprint,
        "split": cfg.psnr_split,
        "images": len(images),
        "psnr_db": round(value, 4),
    }


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """Compute every figure, write `<output>/eval.json`, return the document."""
    from PIL import Image

    rows, images = read_samples(cfg)
    out = fs.resolve(cfg.output_dir, storage=cfg.storage)
    cache = cfg.classifier.cache or out.join("classifier").uri
    judge, judge_info = load_or_train(cfg.digits, cache, cfg.classifier, cfg.storage, log)
    real, real_labels = load_digit_split(cfg.digits, "val", cfg.storage)
    if images.shape[1:3] != real.shape[1:3]:  # compare at the real digits' size
        h, w = real.shape[1:3]
        images = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BILINEAR))
                for im in images
            ]
        )
    parsed = [prompt_digit(r["prompt"]) for r in rows]
    labels, kinds = [p[0] for p in parsed], [p[1] for p in parsed]
    predicted = predict(judge, images, cfg.classifier.image_size)
    scores = [r.get("clip_score") for r in rows]
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "samples": cfg.samples,
        "recipes": sorted({str(r.get("recipe", "")) for r in rows}),  # ar, ldm: whichever sampled
        "digits": cfg.digits,
        "images": len(rows),
        "prompts": len({r["prompt"] for r in rows}),
        "unlabelled_prompts": sorted(
            {r["prompt"] for r, lab in zip(rows, labels, strict=True) if lab is None}
        ),
        "classifier": {
            "val_accuracy": judge_info["val_accuracy"],
            "train_samples": judge_info["train_samples"],
            "val_samples": judge_info["val_samples"],
            "reused": judge_info["reused"],
            "path": cache,
        },
        "accuracy": accuracy_report(labels, kinds, predicted),
        "diversity": diversity_report(rows, labels, images, real, real_labels),
        "clip_score": {
            "mean": _mean(scores),
            "images": sum(s is not None for s in scores),
        },
        "tokenizer": tokenizer_report(cfg, log),
    }
    fs.ensure_dir(out)
    fs.write_bytes_atomic(out.join(EVAL_FILE), json.dumps(doc, indent=2).encode())
    return doc


def format_table(doc: dict) -> str:
    """The short table `t2i eval` prints."""

    def f(v, spec=".3f"):
        return "   -  " if v is None else format(v, spec)

    acc, div = doc["accuracy"], doc["diversity"]
    lines = [
        f"judge: CNN trained on {doc['classifier']['train_samples']} real digits, "
        f"val accuracy {f(doc['classifier']['val_accuracy'])}",
        "digit  accuracy  diversity(gen)  diversity(real)",
    ]
    for d in range(10):
        dv = div["per_digit"][str(d)]
        lines.append(
            f"{d:>5}  {f(acc['per_digit'][str(d)]):>8}  {f(dv['generated']):>14}  "
            f"{f(dv['real']):>15}"
        )
    bt = acc["by_template"]
    lines.append(f"  all  {f(acc['overall']):>8}  {f(div['generated']):>14}  {f(div['real']):>15}")
    lines.append(
        f"accuracy by prompt template: train {f(bt['train'])}, held-out {f(bt['heldout'])}, "
        f"other {f(bt['other'])}"
    )
    lines.append(f"mean CLIP score: {f(doc['clip_score']['mean'], '.4f')}")
    if doc["tokenizer"]:
        t = doc["tokenizer"]
        lines.append(
            f"tokenizer ({t['kind']}) PSNR on {t['images']} {t['split']} images: "
            f"{t['psnr_db']:.2f} dB"
        )
    return "\n".join(lines)


def _eval_task(cfg_dict: dict) -> dict:
    import torch

    cfg = from_dict(EvalConfig, cfg_dict)  # rebuilt here: workers never read driver globals
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    return run_eval(cfg)


def eval_on_ray(cfg: EvalConfig) -> dict:
    """`run_eval` inside a Ray task on the connected cluster (call `init_ray` first)."""
    from trainer.sampling.run import run_as_ray_task

    return run_as_ray_task(_eval_task, cfg, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
