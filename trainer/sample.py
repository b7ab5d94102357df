"""`t2i sample`: images from text prompts with a trained model, reranked by CLIP.

    t2i sample --config jobs/configs/sample_digits.yaml [sample.prompts='["the number 7"]']

The autoregressive recipe ("ar"): each prompt is tokenized with the text tokenizer of the token
dataset the DALL-E model trained on; `sample.candidates` code grids per prompt are decoded with the
KV cache (`DalleTransformer.prefill` / `decode_step`) under temperature, top-k and top-p; the image
tokenizer turns codes into pixels; a CLIP model scores every candidate against its prompt and the
best `sample.keep` are written. Recipe-specific work lives behind one function per recipe
(`RECIPES`); reranking and writing are shared, so the latent-diffusion recipe only adds its own.

Seeds are per candidate: candidate c of prompt p draws its randomness from
`candidate_seed(sample.seed, p, c)` alone (recorded as `seed` in samples.jsonl), so an image does
not depend on which other candidates shared its batch (up to the rounding of batched matmuls,
which can flip a draw that lies on a probability boundary; fp32 on CPU is exact in the tests).

Output (local dir or s3://):
    images/<prompt>_<rank>.png    kept images, rank 1 = best CLIP score
    samples.jsonl                 one row per image: recipe, prompt, prompt_index, path, rank,
                                  clip_score, seed, candidate
    grid.png                      one row per prompt, labelled, tiny images upscaled
    config.yaml                   the resolved SampleConfig
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
import torch

from data_pipeline import fs
from trainer.config import REQUIRED, RayConfig, StorageConfig, from_dict, load_config, to_yaml
from trainer.engine import DTYPES, resolve_precision

SAMPLES_FILE = "samples.jsonl"
GRID_FILE = "grid.png"
IMAGES_DIR = "images"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class SamplingSection:
    """What to sample and how."""

    prompts: list[str] = field(default_factory=list)  # text prompts (or use prompts_file)
    # UTF-8 file, one prompt per line ('#' comments); local or s3://. When set it replaces
    # `prompts` (so `sample.prompts_file=...` on the command line overrides a config's list).
    prompts_file: str = ""
    candidates: int = 8  # images sampled per prompt, reranked by CLIP
    keep: int = 2  # best-scoring candidates written per prompt (<= candidates)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax, no randomness)
    top_k: int = 0  # sample among the k most likely codes; 0 = off
    top_p: float = 1.0  # nucleus: smallest set of codes with probability >= top_p; 1 = off
    seed: int = 0  # base seed; each candidate derives its own (see candidate_seed)
    batch_size: int = 64  # sequences decoded together


@dataclass
class RerankClipSection:
    """The CLIP model that scores candidates: an open_clip architecture + local weights."""

    enabled: bool = True  # False: keep the first `keep` candidates, clip_score is null
    model: str = "clip_digits_tiny"  # open_clip architecture: built-in name or model_config stem
    model_config: str = "jobs/configs/clip_digits_tiny.json"  # custom architecture JSON; "": none
    # `t2i train` CLIP run or checkpoint dir (its model.safetensors), or an open_clip checkpoint
    # file; local or s3://. "": random weights (tests and benchmarks only: scores mean nothing).
    checkpoint: str = ""
    batch_size: int = 64  # images per CLIP forward pass


@dataclass
class SampleConfig:
    """`t2i sample`: a trained text-to-image model -> reranked images, samples.jsonl, grid.png."""

    recipe: Literal["ar"] = "ar"  # "ar": DALL-E transformer over image-tokenizer codes
    model: str = REQUIRED  # DALL-E `t2i train` run dir (newest exported checkpoint) or ckpt dir
    tokens: str = REQUIRED  # its token dataset: the text tokenizer for the prompts comes from it
    image_tokenizer: str = REQUIRED  # decodes codes to pixels (run, checkpoint or convert dir)
    output: str = REQUIRED  # output dir or s3://bucket/prefix (files are overwritten)
    sample: SamplingSection = field(default_factory=SamplingSection)
    clip: RerankClipSection = field(default_factory=RerankClipSection)
    # transformer dtype; auto: bf16 where the hardware has it (GPU, AVX512-BF16/AMX), else fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    grid_cell: int = 96  # min side of one image in grid.png (upscaled by an integer factor)
    num_cpus: float = 2.0  # the Ray task's CPUs (and torch threads)
    num_gpus: float = 1.0  # the Ray task's GPUs, requested only when the cluster has GPUs
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def check_config(cfg: SampleConfig) -> None:
    """Raise ValueError naming the first inconsistent sampling value."""
    s = cfg.sample
    if s.candidates < 1 or not 1 <= s.keep <= s.candidates:
        raise ValueError(
            f"sample.keep must be in [1, sample.candidates={s.candidates}], got {s.keep}"
        )
    if s.temperature < 0:
        raise ValueError(f"sample.temperature must be >= 0, got {s.temperature}")
    if s.top_k < 0:
        raise ValueError(f"sample.top_k must be >= 0, got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"sample.top_p must be in (0, 1], got {s.top_p}")
    if s.batch_size < 1:
        raise ValueError(f"sample.batch_size must be >= 1, got {s.batch_size}")
    if not s.prompts and not s.prompts_file:
        raise ValueError("no prompts: set sample.prompts or sample.prompts_file")


# --------------------------------------------------------------------------------------------
# Sampling math (pure functions)
# --------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with every code outside the top-k / top-p support set to -inf.

    top-k keeps exactly the k largest (ties broken by index); top-p then keeps the smallest set of
    the most likely remaining codes whose probability reaches `top_p` (always at least one).
    """
    out = logits.float()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        idx = out.topk(top_k, dim=-1).indices  # (B, k)
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely codes
        drop_sorted = mass_before >= top_p  # the set already reached top_p without this code
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def candidate_seed(base: int, prompt_index: int, candidate: int) -> int:
    """A 63-bit seed for one candidate, independent of batching and of the other prompts."""
    state = np.random.SeedSequence([base, prompt_index, candidate]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def next_codes(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """One sampling step: logits (B, V), one uniform in [0, 1) per row (B,) -> codes (B,).

    Inverse-CDF sampling with a caller-supplied uniform keeps each row's draw a function of its
    own seed. temperature 0 is greedy.
    """
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf)[:, None] * cdf[:, -1:]).contiguous()  # (B, 1)
    # first code whose cdf exceeds the target: zero-probability codes are never chosen
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_codes(
    model,
    text: torch.Tensor,
    seeds: list[int],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> torch.Tensor:
    """Text ids (B, text_len) -> sampled image codes (B, grid**2), raster order.

    `use_cache=False` recomputes the whole prefix for every code (the reference the KV cache is
    tested against; O(N^2) slower).
    """
    n = model.cfg.image_len
    if len(seeds) != text.shape[0]:
        raise ValueError(f"need one seed per row: {len(seeds)} seeds for {text.shape[0]} rows")
    # (B, N): row b's uniforms come from its own generator only
    uniforms = torch.stack(
        [
            torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds
        ]
    ).to(text.device)

    def step(logits: torch.Tensor, j: int) -> torch.Tensor:
        return next_codes(logits, uniforms[:, j], temperature, top_k, top_p)

    codes = torch.zeros(text.shape[0], n, dtype=torch.long, device=text.device)
    if use_cache:
        cache, logits = model.prefill(text)
        for j in range(n):
            codes[:, j] = step(logits, j)
            if j < n - 1:
                logits = model.decode_step(codes[:, j], cache)
        return codes
    for j in range(n):
        # the forward reads codes[:, :j] (the slot j is a target only, never read)
        logits = model(text, codes[:, : j + 1])[1][:, j]
        codes[:, j] = step(logits, j)
    return codes


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _download(loc: fs.Location, tmp: str) -> str:
    """A local path for `loc` (local files are used in place; S3 objects copied into `tmp`)."""
    if not loc.is_s3:
        return loc.path
    path = os.path.join(tmp, os.path.basename(loc.path))
    with open(path, "wb") as f:
        f.write(fs.read_bytes(loc))
    return path


def load_dalle(path: str, storage: StorageConfig, device: str = "cpu"):
    """(DalleTransformer in eval mode, its TrainConfig) from a run or exported checkpoint dir."""
    from safetensors.torch import load_file

    from trainer.checkpoint import find_exported
    from trainer.config import TrainConfig
    from trainer.models.dalle import DalleTransformer
    from trainer.models.image_tokenizer import CONFIG, WEIGHTS

    loc = fs.resolve(path, endpoint_url=storage.endpoint_url, region=storage.region)
    src = find_exported(loc, weights=WEIGHTS, config=CONFIG, what="DALL-E model")
    with tempfile.TemporaryDirectory(prefix="t2i-sample-") as tmp:
        train_cfg = load_config(TrainConfig, _download(src.join(CONFIG), tmp), require=False)
        if train_cfg.objective != "dalle":
            raise ValueError(
                f"{src.join(CONFIG).uri}: objective is {train_cfg.objective!r}; "
                "recipe 'ar' needs a DALL-E run (objective: dalle)"
            )
        state = load_file(_download(src.join(WEIGHTS), tmp))
    model = DalleTransformer(train_cfg.dalle)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), train_cfg


def clip_spec(cfg: RerankClipSection, storage: StorageConfig, tmp: str, threads: int):
    """The `ClipSpec` of the rerank model; a run/checkpoint dir or S3 file becomes a local file."""
    from data_pipeline.clip_score import ClipSpec, load_model_config_file
    from trainer.checkpoint import find_exported
    from trainer.models.image_tokenizer import CONFIG, WEIGHTS

    checkpoint = ""
    if cfg.checkpoint:
        loc = fs.resolve(cfg.checkpoint, endpoint_url=storage.endpoint_url, region=storage.region)
        kind = loc.fs.get_file_info(loc.path).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"clip.checkpoint: no such file or directory {loc.uri}")
        if kind == pafs.FileType.Directory:  # a CLIP `t2i train` run or checkpoint
            loc = find_exported(loc, weights=WEIGHTS, config=CONFIG, what="CLIP model")
            loc = loc.join(WEIGHTS)
        checkpoint = _download(loc, tmp)
    model_config = load_model_config_file(cfg.model_config) if cfg.model_config else None
    return ClipSpec(cfg.model, model_config, checkpoint, cfg.batch_size, threads)


def read_prompts(cfg: SampleConfig) -> list[str]:
    """`sample.prompts_file`'s lines (blank and '#' lines skipped) if set, else `sample.prompts`."""
    s = cfg.sample
    if not s.prompts_file:
        prompts = [str(p) for p in s.prompts]
    else:
        loc = fs.resolve(
            s.prompts_file, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region
        )
        lines = fs.read_bytes(loc).decode("utf-8").splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"sample.prompts_file {loc.uri}: no prompts in the file")
    if any(not p.strip() for p in prompts):
        raise ValueError("sample.prompts: empty prompt")
    return prompts


# --------------------------------------------------------------------------------------------
# Recipes: prompts -> candidate images
# --------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Every candidate of every prompt, before reranking."""

    images: np.ndarray  # uint8 (P, C, H, W, 3)
    seeds: np.ndarray  # int64 (P, C): the seed each candidate was drawn with
    codes: np.ndarray | None = None  # AR: int64 (P, C, grid**2) sampled codes


def load_ar_models(cfg: SampleConfig, device: str):
    """(DALL-E in `cfg.precision`, text tokenizer, image tokenizer), checked against each other
    and against the token dataset the model trained on."""
    from data_pipeline.text_tokens import load_text_tokenizer
    from trainer.models.image_tokenizer import load_image_tokenizer

    model, train_cfg = load_dalle(cfg.model, cfg.storage, device)
    m = train_cfg.dalle
    text_tok = load_text_tokenizer(cfg.tokens, cfg.storage)
    if text_tok.text_len != m.text_len or text_tok.vocab_size > m.text_vocab:
        raise ValueError(
            f"tokens {cfg.tokens}: its text tokenizer (text_len={text_tok.text_len}, "
            f"vocab_size={text_tok.vocab_size}) does not fit the model (dalle.text_len="
            f"{m.text_len}, dalle.text_vocab={m.text_vocab})"
        )
    image_tok = load_image_tokenizer(cfg.image_tokenizer, storage=cfg.storage, device=device)
    if not image_tok.discrete or image_tok.vocab_size != m.image_vocab:
        raise ValueError(
            f"image_tokenizer {cfg.image_tokenizer}: a {image_tok.kind} with vocab_size "
            f"{image_tok.vocab_size} cannot decode the model's codes (dalle.image_vocab="
            f"{m.image_vocab})"
        )
    check_same_tokenizer(cfg, image_tok.fingerprint)
    model = model.to(DTYPES[resolve_precision(cfg.precision)])  # the KV cache follows it
    return model, text_tok, image_tok


def generate_ar(cfg: SampleConfig, prompts: list[str], device: str, log=print) -> Candidates:
    """DALL-E recipe: text tokens -> KV-cached code sampling -> image tokenizer decode."""
    s = cfg.sample
    model, text_tok, image_tok = load_ar_models(cfg, device)
    m = model.cfg
    n_prompts, n_cand, grid = len(prompts), s.candidates, m.image_grid
    for line in text_tok.truncation_warnings(prompts):
        log(f"warning: prompt {line}")
    text = torch.from_numpy(text_tok.encode(prompts).astype(np.int64)).to(device)  # (P, T)
    rows = [(p, c) for p in range(n_prompts) for c in range(n_cand)]
    seeds = np.array(
        [[candidate_seed(s.seed, p, c) for c in range(n_cand)] for p in range(n_prompts)],
        dtype=np.int64,
    )
    codes = np.zeros((n_prompts, n_cand, m.image_len), np.int64)
    images = None
    t0, n_batches = time.monotonic(), math.ceil(len(rows) / s.batch_size)
    for b in range(n_batches):
        chunk = rows[b * s.batch_size : (b + 1) * s.batch_size]
        p_idx = torch.tensor([p for p, _ in chunk], device=device)
        out = sample_codes(
            model,
            text[p_idx],
            [int(seeds[p, c]) for p, c in chunk],
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
        )  # (b, N)
        with torch.no_grad():
            pixels = image_tok.decode(out.view(-1, grid, grid))  # (b, 3, H, W) in [0, 1]
        pixels = to_uint8(pixels)
        if images is None:
            images = np.zeros((n_prompts, n_cand, *pixels.shape[1:]), np.uint8)
        for i, (p, c) in enumerate(chunk):
            codes[p, c] = out[i].cpu().numpy()
            images[p, c] = pixels[i]
        done = min((b + 1) * s.batch_size, len(rows))
        rate = done * m.image_len / max(time.monotonic() - t0, 1e-9)
        log(f"sample: {done}/{len(rows)} candidates ({rate:.0f} image tokens/s)")
    return Candidates(images=images, seeds=seeds, codes=codes)


def check_same_tokenizer(cfg: SampleConfig, fingerprint: str) -> None:
    """Refuse an image tokenizer other than the one the token dataset was encoded with: its codes
    would mean something else, and decoding them gives noise without any error."""
    from data_pipeline.token_dataset import read_any_manifest

    base = fs.resolve(cfg.tokens, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    recorded = (read_any_manifest(base).get("image_tokenizer") or {}).get("fingerprint")
    if recorded and recorded != fingerprint:
        raise ValueError(
            f"image_tokenizer {cfg.image_tokenizer}: weights sha256 {fingerprint[:12]}... differ "
            f"from the tokenizer {cfg.tokens} was encoded with ({recorded[:12]}...); pass that one"
        )


# recipe name -> generate(cfg, prompts, device, log) -> Candidates
RECIPES: dict[str, Callable[..., Candidates]] = {"ar": generate_ar}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    x = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Reranking and output
# --------------------------------------------------------------------------------------------


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
    out = fs.resolve(cfg.output, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
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


def run_sample(cfg: SampleConfig, log=print) -> dict:
    """Sample, rerank and write (in this process); returns a summary for the caller to print."""
    check_config(cfg)
    prompts = read_prompts(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.monotonic()
    cand = RECIPES[cfg.recipe](cfg, prompts, device, log)
    seconds = time.monotonic() - t0
    scores = None
    if cfg.clip.enabled:
        with tempfile.TemporaryDirectory(prefix="t2i-clip-") as tmp:
            spec = clip_spec(cfg.clip, cfg.storage, tmp, threads=max(1, int(cfg.num_cpus)))
            scores = clip_scores(spec, cand.images, prompts)
    kept = rerank(scores, len(prompts), cfg.sample.candidates, cfg.sample.keep)
    rows = write_outputs(cfg, prompts, cand, scores, kept)
    kept_scores = [r["clip_score"] for r in rows if r["clip_score"] is not None]
    return {
        "output": cfg.output,
        "prompts": len(prompts),
        "candidates": int(cand.seeds.size),
        "images": len(rows),
        "sampling_seconds": round(seconds, 3),
        "mean_clip_score_kept": float(np.mean(kept_scores)) if kept_scores else None,
        "mean_clip_score_all": None if scores is None else float(scores.mean()),
    }


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def _sample_task(cfg_dict: dict) -> dict:
    cfg = from_dict(SampleConfig, cfg_dict)  # rebuilt here: workers never read driver globals
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    return run_sample(cfg)


def run_as_ray_task(fn: Callable[[dict], dict], cfg, *, num_cpus: float, num_gpus: float) -> dict:
    """Run `fn(asdict(cfg))` as one Ray task (GPUs requested only if the cluster has any)."""
    import ray

    gpus = num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=gpus, max_retries=0)
    return ray.get(task.remote(asdict(cfg)))


def sample_on_ray(cfg: SampleConfig) -> dict:
    """`run_sample` inside a Ray task on the connected cluster (call `init_ray` first)."""
    check_config(cfg)
    return run_as_ray_task(_sample_task, cfg, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
