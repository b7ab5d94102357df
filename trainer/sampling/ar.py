"""The autoregressive recipe of `t2i sample`: a DALL-E transformer samples image codes.

Each prompt is tokenized with the text tokenizer of the token dataset the DALL-E model trained on;
`sample.candidates` code grids per prompt are decoded with the KV cache
(`DalleTransformer.prefill` / `decode_step`) under temperature, top-k and top-p; the image
tokenizer turns codes into pixels.

Seeds are per candidate: candidate c of prompt p draws its randomness from
`candidate_seed(sample.seed, p, c)` alone (recorded as `seed` in samples.jsonl), so an image does
not depend on which other candidates shared its batch (up to the rounding of batched matmuls,
which can flip a draw that lies on a probability boundary; fp32 on CPU is exact in the tests).
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.config import StorageConfig
from trainer.engine import DTYPES, resolve_precision
from trainer.sampling.common import (
    Candidates,
    Chunk,
    candidate_seed,
    check_same_tokenizer,
    generate_all,
    load_exported,
    to_uint8,
)
from trainer.sampling.config import SampleConfig


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


def load_dalle(path: str, storage: StorageConfig, device: str = "cpu"):
    """(DalleTransformer in eval mode, its TrainConfig) from a run or exported checkpoint dir."""
    from trainer.models.dalle import DalleTransformer

    _, train_cfg, state = load_exported(path, storage, "dalle", "DALL-E model")
    model = DalleTransformer(train_cfg.dalle)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), train_cfg


def load_ar_models(cfg: SampleConfig, device: str):
    """(DALL-E in `cfg.precision`, text tokenizer, image tokenizer), checked against each other
    and against the token dataset the model trained on."""
    from data_pipeline.text_tokens import load_text_tokenizer
    from trainer.pretrained.image_tokenizers import load_image_tokenizer

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
    # auto: from the device this actor computes on, not from whether its node has a GPU
    gpu = torch.device(device).type == "cuda"
    model = model.to(DTYPES[resolve_precision(cfg.precision, gpu)])  # the KV cache follows it
    return model, text_tok, image_tok


class ArGenerator:
    """The DALL-E recipe, loaded once: text tokens -> KV-cached code sampling -> image-tokenizer
    decode. `gen(rows) -> Chunk` samples the given (prompt, candidate) rows."""

    units = "image tokens"

    def __init__(self, cfg: SampleConfig, prompts: list[str], device: str, log=print):
        self.cfg = cfg
        self.model, text_tok, self.image_tok = load_ar_models(cfg, device)
        for line in text_tok.truncation_warnings(prompts):
            log(f"warning: prompt {line}")
        ids = text_tok.encode(prompts).astype(np.int64)
        self.text = torch.from_numpy(ids).to(device)  # (P, T)
        self.units_per_candidate = self.model.cfg.image_len

    def __call__(self, rows: list[tuple[int, int]]) -> Chunk:
        s, grid = self.cfg.sample, self.model.cfg.image_grid
        seeds = np.array([candidate_seed(s.seed, p, c) for p, c in rows], np.int64)
        p_idx = torch.tensor([p for p, _ in rows], device=self.text.device)
        out = sample_codes(
            self.model,
            self.text[p_idx],
            seeds.tolist(),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
        )  # (b, N)
        with torch.no_grad():
            pixels = self.image_tok.decode(out.view(-1, grid, grid))  # (b, 3, H, W) in [0, 1]
        return Chunk(rows, to_uint8(pixels), seeds, out.cpu().numpy())


def generate_ar(cfg: SampleConfig, prompts: list[str], device: str, log=print) -> Candidates:
    """Every candidate of every prompt with the DALL-E recipe, in this process."""
    return generate_all(ArGenerator(cfg, prompts, device, log), cfg, prompts, log)
