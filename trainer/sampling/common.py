"""What both sampling recipes share: per-candidate seeds, chunks of (prompt, candidate) rows,
CLIP reranking, and writing the kept images, samples.jsonl and the labelled grid.

Output (local dir or s3://):
    images/<prompt>_<rank>.png    kept images, rank 1 = best CLIP score
    samples.jsonl                 one row per image: recipe, prompt, prompt_index, path, rank,
                                  clip_score, seed, candidate
    grid.png                      one row per prompt, labelled, tiny images upscaled
    config.yaml                   the resolved SampleConfig
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import torch

from data_pipeline import fs
from data_pipeline.config import StorageConfig, to_yaml
from trainer.sampling.config import RerankClipSection, SampleConfig

SAMPLES_FILE = "samples.jsonl"
GRID_FILE = "grid.png"
IMAGES_DIR = "images"


def candidate_seed(base: int, prompt_index: int, candidate: int) -> int:
    """A 63-bit seed for one candidate, independent of batching and of the other prompts."""
    state = np.random.SeedSequence([base, prompt_index, candidate]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def download_local(loc: fs.Location, tmp: str) -> str:
    """A local path for `loc` (local files are used in place; S3 objects copied into `tmp`)."""
    if not loc.is_s3:
        return loc.path
    path = os.path.join(tmp, os.path.basename(loc.path))
    with open(path, "wb") as f:
        f.write(fs.read_bytes(loc))
    return path


def clip_spec(cfg: RerankClipSection, storage: StorageConfig, tmp: str, threads: int):
    """The `ClipSpec` of the rerank model: a run/checkpoint dir becomes its exported weights file,
    an s3:// file is fetched once per node (`fs.fetch_checkpoint`), and the weights are checked
    against the model (the OpenAI QuickGELU trap) before any candidate is drawn."""
    from data_pipeline.config import load_config
    from trainer.checkpoint import find_exported
    from trainer.config import TrainConfig
    from trainer.models.image_tokenizer import CONFIG, WEIGHTS
    from trainer.pretrained.clip_models import ClipSpec, check_checkpoint, open_clip_arch

    checkpoint, activation = "", cfg.checkpoint_activation
    if cfg.checkpoint:
        loc = fs.resolve(cfg.checkpoint, storage=storage)
        kind = loc.fs.get_file_info(loc.path).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"clip.checkpoint: no such file or directory {loc.uri}")
        if kind == pafs.FileType.Directory:  # a CLIP `t2i train` run or checkpoint
            loc = find_exported(loc, weights=WEIGHTS, config=CONFIG, what="CLIP model")
            run = load_config(TrainConfig, download_local(loc.join(CONFIG), tmp), require=False,
                              migrate=True)  # fmt: skip
            if activation == "auto" and run.clip.model == cfg.model:
                # trained by `t2i train` as this very architecture: its activation is the model's
                arch = open_clip_arch(cfg.model, cfg.load_model_config())
                activation = "quick_gelu" if arch.get("quick_gelu") else "gelu"
            loc = loc.join(WEIGHTS)
        checkpoint = loc.uri
    spec = ClipSpec(cfg.model, cfg.load_model_config(), checkpoint, cfg.batch_size, threads,
                    activation, storage)  # fmt: skip
    if checkpoint:
        spec = dataclasses.replace(spec, checkpoint=check_checkpoint(spec).path)
    return spec


def load_exported(path: str, storage: StorageConfig, objective: str, what: str):
    """(checkpoint Location, its TrainConfig, its model.safetensors state) of the newest complete
    checkpoint with exported weights under a run dir (or that checkpoint dir), which must have
    been trained with `objective`."""
    from safetensors.torch import load_file

    from data_pipeline.config import load_config
    from trainer.checkpoint import find_exported
    from trainer.config import TrainConfig
    from trainer.models.image_tokenizer import CONFIG, WEIGHTS

    loc = fs.resolve(path, storage=storage)
    src = find_exported(loc, weights=WEIGHTS, config=CONFIG, what=what)
    with tempfile.TemporaryDirectory(prefix="t2i-sample-") as tmp:
        config = download_local(src.join(CONFIG), tmp)  # migrate: see TrainConfig.RENAMED
        train_cfg = load_config(TrainConfig, config, require=False, migrate=True)
        if train_cfg.objective != objective:
            raise ValueError(
                f"{src.join(CONFIG).uri}: objective is {train_cfg.objective!r}; this recipe needs "
                f"a {what} run (objective: {objective})"
            )
        state = load_file(download_local(src.join(WEIGHTS), tmp))
    return src, train_cfg, state


@dataclass
class Candidates:
    """Every candidate of every prompt, before reranking."""

    images: np.ndarray  # uint8 (P, C, H, W, 3)
    seeds: np.ndarray  # int64 (P, C): the seed each candidate was drawn with
    codes: np.ndarray | None = None  # AR: int64 (P, C, grid**2) sampled codes


@dataclass
class Chunk:
    """One unit of a sampling job: some (prompt, candidate) rows and what they produced."""

    rows: list[tuple[int, int]]  # (prompt index, candidate index)
    images: np.ndarray  # uint8 (N, H, W, 3)
    seeds: np.ndarray  # int64 (N,)
    codes: np.ndarray | None = None  # AR: int64 (N, grid**2)


def all_rows(n_prompts: int, n_cand: int) -> list[tuple[int, int]]:
    return [(p, c) for p in range(n_prompts) for c in range(n_cand)]


def split_rows(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def assemble(chunks: list[Chunk], n_prompts: int, n_cand: int) -> Candidates:
    """The chunks' rows in their (prompt, candidate) places; every row exactly once."""
    first = chunks[0]
    images = np.zeros((n_prompts, n_cand, *first.images.shape[1:]), np.uint8)
    seeds = np.zeros((n_prompts, n_cand), np.int64)
    codes = None if first.codes is None else np.zeros((n_prompts, n_cand, first.codes.shape[1]),
                                                      np.int64)  # fmt: skip
    seen = np.zeros((n_prompts, n_cand), bool)
    for ch in chunks:
        for i, (p, c) in enumerate(ch.rows):
            if seen[p, c]:
                raise RuntimeError(f"sample: candidate {c} of prompt {p} generated twice")
            seen[p, c] = True
            images[p, c], seeds[p, c] = ch.images[i], ch.seeds[i]
            if codes is not None:
                codes[p, c] = ch.codes[i]
    if not seen.all():
        p, c = np.argwhere(~seen)[0]
        raise RuntimeError(f"sample: candidate {c} of prompt {p} was never generated")
    return Candidates(images=images, seeds=seeds, codes=codes)


def generate_all(generator, cfg, prompts: list[str], log=print) -> Candidates:
    """Every candidate of every prompt in this process, `sample.batch_size` at a time.
    `generator(rows) -> Chunk` is a recipe's loaded sampler (`GENERATORS` in run.py)."""
    s = cfg.sample
    rows = all_rows(len(prompts), s.candidates)
    chunks, done, t0 = [], 0, time.monotonic()
    for chunk_rows in split_rows(rows, s.batch_size):
        chunks.append(generator(chunk_rows))
        done += len(chunk_rows)
        rate = done * generator.units_per_candidate / max(time.monotonic() - t0, 1e-9)
        log(f"sample: {done}/{len(rows)} candidates ({rate:.0f} {generator.units}/s)")
    return assemble(chunks, len(prompts), s.candidates)


def check_same_tokenizer(cfg: SampleConfig, fingerprint: str) -> None:
    """Refuse an image tokenizer other than the one the token dataset was encoded with: its codes
    would mean something else, and decoding them gives noise without any error."""
    from data_pipeline.token_dataset import read_any_manifest

    base = fs.resolve(cfg.tokens, storage=cfg.storage)
    recorded = (read_any_manifest(base).get("image_tokenizer") or {}).get("fingerprint")
    if recorded and recorded != fingerprint:
        raise ValueError(
            f"image_tokenizer {cfg.image_tokenizer}: weights sha256 {fingerprint[:12]}... differ "
            f"from the tokenizer {cfg.tokens} was encoded with ({recorded[:12]}...); pass that one"
        )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    x = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def clip_scores(spec, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Cosine(image, prompt) of every candidate: images (P, C, H, W, 3) -> scores (P, C)."""
    from PIL import Image

    from data_pipeline.clip_score import ClipScorer, clip_image_size

    scorer = ClipScorer(spec)
    size = clip_image_size(spec)
    n_prompts, n_cand = images.shape[:2]
    flat = images.reshape(-1, *images.shape[2:])
    captions = [prompts[i // n_cand] for i in range(len(flat))]
    scores = np.zeros(len(flat), np.float32)
    for s in range(0, len(flat), spec.batch_size):
        batch = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                for im in flat[s : s + spec.batch_size]
            ]
        )
        img, txt = scorer.encode(batch, captions[s : s + spec.batch_size])
        scores[s : s + len(batch)] = (img * txt).sum(axis=1)
    return scores.reshape(n_prompts, n_cand)


def rerank(scores: np.ndarray | None, n_prompts: int, n_cand: int, keep: int) -> np.ndarray:
    """Indices (P, keep) of the kept candidates, best first (no scores: the first `keep`)."""
    if scores is None:
        return np.tile(np.arange(keep), (n_prompts, 1))
    return np.argsort(-scores, axis=1, kind="stable")[:, :keep]


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_grid(rows: list[np.ndarray], labels: list[str], cell: int = 96):
    """A labelled grid: row i shows the images (K, H, W, 3) of `labels[i]`, label on the left.

    Images are upscaled by the integer factor that brings them to at least `cell` pixels (nearest
    neighbour: 32-px digits stay crisp, and the default font stays legible beside them).
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = rows[0].shape[1:3]
    scale = max(1, math.ceil(cell / max(h, w)))
    ch, cw, pad = h * scale, w * scale, 4
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in labels) + 2 * pad
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (cw + pad), len(rows) * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (images, label) in enumerate(zip(rows, labels, strict=True)):
        y = i * (ch + pad)
        _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
        draw.text((pad, y + (ch - (bottom - top)) // 2 - top), label, fill="black", font=font)
        for j, im in enumerate(images):
            tile = Image.fromarray(im).resize((cw, ch), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + j * (cw + pad), y))
    return grid


def write_outputs(
    cfg: SampleConfig,
    prompts: list[str],
    cand: Candidates,
    scores: np.ndarray | None,
    kept: np.ndarray,
) -> list[dict]:
    """Write the kept PNGs, samples.jsonl, grid.png and config.yaml; return the jsonl rows."""
    out = fs.resolve(cfg.output, storage=cfg.storage)
    fs.ensure_dir(out)
    rows, grid_rows = [], []
    for p, prompt in enumerate(prompts):
        for rank, c in enumerate(kept[p], start=1):
            rel = f"{IMAGES_DIR}/{p:04d}_{rank:02d}.png"
            fs.write_bytes_atomic(out.join(rel), encode_png(cand.images[p, c]))
            rows.append(
                {
                    "recipe": cfg.recipe,
                    "prompt": prompt,
                    "prompt_index": p,
                    "path": rel,  # relative to the output dir
                    "rank": rank,
                    "clip_score": None if scores is None else round(float(scores[p, c]), 6),
                    "seed": int(cand.seeds[p, c]),
                    "candidate": int(c),
                }
            )
        grid_rows.append(cand.images[p, kept[p]])
    jsonl = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    fs.write_bytes_atomic(out.join(SAMPLES_FILE), jsonl.encode())
    grid = make_grid(grid_rows, prompts, cfg.grid_cell)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    fs.write_bytes_atomic(out.join(GRID_FILE), buf.getvalue())
    fs.write_bytes_atomic(out.join("config.yaml"), to_yaml(cfg).encode())
    return rows
