"""The DALL-E transformer: a decoder-only model over [BOS] + text + image tokens, single device.

Sequence and positions are documented in `trainer.models.masks`. In short: the model reads
BOS + text_len text tokens + the first grid**2 - 1 image codes (L = text_len + grid**2 input
positions); `text_logits[:, i]` predicts text token i and `image_logits[:, j]` image code j.

Internal text ids (what the text embedding reads and the text head predicts):

    0 .. text_vocab-1                  BPE ids from the dataset (text_pad_id never survives)
    text_vocab + i                     the pad token of text position i (i < text_len)
    text_vocab + text_len              "no text": position 0 of a caption that is all padding
    text_vocab + text_len + 1          BOS (embedding only; never predicted)

so the text head has `text_vocab + text_len + 1` outputs (`DalleConfig.text_vocab_internal`).
Distribution, precision and activation checkpointing are applied from outside (the engine calls
`enable_activation_checkpointing`, which wraps each of `model.blocks`); this file imports only
torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.attention import (
    ATTN_IMPLS,
    KVCache,
    Linear,
    SelfAttention,
    SeqLayout,
    local_window,
)
from trainer.models.checks import check_positive_ints
from trainer.models.masks import ATTN_PATTERNS, attention_schedule


@dataclass
class DalleConfig:
    """Shape of a DALL-E transformer. Defaults are the `tiny` preset (tests, smoke runs)."""

    text_vocab: int = 64  # BPE vocab size of the token dataset (ids 0 .. text_vocab-1)
    text_pad_id: int = 0  # dataset id that marks padding (replaced by per-position pad tokens)
    text_len: int = 8  # text tokens per caption (padded/truncated by the tokenizer), <= 256
    image_vocab: int = 64  # codebook size of the image tokenizer (dVAE/VQGAN), e.g. 8192
    image_grid: int = 4  # side of the code grid: grid**2 image tokens (32 -> 1024 for 256 px)
    dim: int = 64  # residual stream width C
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads per block
    head_dim: int = 16  # width of one head (heads * head_dim need not equal dim)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.0  # embedding, attention-probability and residual dropout
    attn_pattern: Literal["full", "dalle", "row", "col", "conv"] = "dalle"  # see attention_schedule
    conv_kernel: int = 3  # odd side of the conv-attention window (DALL-E: 11; 3-5 for small grids)
    # auto/sparse: row/col/conv layers computed blockwise (no L x L mask); full layers dense
    # (explicit matmul on CPU, SDPA elsewhere). sdpa/matmul: dense masks everywhere (reference)
    attn_impl: Literal["auto", "sparse", "sdpa", "matmul"] = "auto"

    def __post_init__(self):
        positive = (
            "text_vocab",
            "text_len",
            "image_vocab",
            "image_grid",
            "dim",
            "depth",
            "heads",
            "head_dim",
            "mlp_ratio",
        )
        check_positive_ints(self, positive)
        if self.text_len > 256:
            raise ValueError(f"DalleConfig.text_len must be <= 256, got {self.text_len}")
        if not 0 <= self.text_pad_id < self.text_vocab:
            raise ValueError(
                f"DalleConfig.text_pad_id must be in [0, text_vocab={self.text_vocab}), "
                f"got {self.text_pad_id}"
            )
        if self.attn_pattern not in ATTN_PATTERNS:
            raise ValueError(
                f"DalleConfig.attn_pattern must be one of {ATTN_PATTERNS}, got {self.attn_pattern!r}"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(
                f"DalleConfig.conv_kernel must be odd and >= 1, got {self.conv_kernel}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DalleConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(
                f"DalleConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}"
            )

    @property
    def image_len(self) -> int:
        """Image tokens per sample (grid**2)."""
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        """Input positions L = BOS + text + image - 1 (the last image code is never fed)."""
        return self.text_len + self.image_len

    @property
    def text_vocab_internal(self) -> int:
        """Text-head outputs: BPE ids + one pad token per position + the "no text" token."""
        return self.text_vocab + self.text_len + 1

    @classmethod
    def from_preset(cls, name: str) -> DalleConfig:
        """The named preset (configs accept `preset: NAME`, see `data_pipeline.config`)."""
        return dalle_preset(name)


# The paper's data shapes (Ramesh et al. 2021): 16384 BPE ids x 256 text tokens, 8192 image codes
# on a 32x32 grid; the sizes below differ in width and depth only.
PAPER_SHAPES = dict(text_vocab=16384, text_len=256, image_vocab=8192, image_grid=32, conv_kernel=11)

PRESETS: dict[str, dict] = {
    # unit tests and smoke runs: milliseconds per step
    "tiny": dict(
        text_vocab=64,
        text_len=8,
        image_vocab=64,
        image_grid=4,
        dim=64,
        depth=4,
        heads=4,
        head_dim=16,
        conv_kernel=3,
    ),  # fmt: skip
    # the bundled digits demo: trains in minutes on 2 CPU cores, with the paper's sparse schedule
    # (row, col, row, conv 5x5). Measured 2026-12-02 (AVX512-BF16): digit accuracy 0.969 on
    # training and held-out phrasings, against 0.956 with full attention.
    "digits": dict(
        text_vocab=1024,
        text_len=24,
        image_vocab=512,
        image_grid=8,
        dim=128,
        depth=4,
        heads=4,
        head_dim=32,
        conv_kernel=5,
    ),  # fmt: skip
    "350m": dict(PAPER_SHAPES, dim=1024, depth=24, heads=16, head_dim=64),  # GPT-2-medium widths
    "1b3": dict(PAPER_SHAPES, dim=2048, depth=24, heads=16, head_dim=128),
    "12b": dict(PAPER_SHAPES, dim=3968, depth=64, heads=62, head_dim=64),  # the paper: 62 x 64
}


def dalle_preset(name: str, **overrides) -> DalleConfig:
    """A named DalleConfig (`tiny`, `digits`, `350m`, `1b3`, `12b`) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown DALL-E preset {name!r} (known: {', '.join(PRESETS)})")
    return replace(DalleConfig(**PRESETS[name]), **overrides)


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, 0.02) inside its own __init__ (see attention.Linear)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


class MLP(nn.Module):
    """GELU MLP: (B, S, C) -> (B, S, C)."""

    def __init__(self, dim: int, hidden: int, depth: int, dropout: float):
        super().__init__()
        self.fc = Linear(dim, hidden)
        self.proj = Linear(hidden, dim, std=0.02 / math.sqrt(2 * depth))  # residual projection
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: DalleConfig, kind: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(
            cfg.dim,
            cfg.heads,
            cfg.head_dim,
            depth=cfg.depth,
            layout=SeqLayout(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel),
            dropout=cfg.dropout,
            impl=cfg.attn_impl,
        )
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.depth, cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple | None = None,
        start: int = 0,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, rows)  # (B, S, C)
        return x + self.mlp(self.ln_2(x))


class DalleTransformer(nn.Module):
    """DALL-E transformer. forward(text (B, text_len), image (B, N)) -> (text_logits, image_logits).

    text holds dataset BPE ids (padding = cfg.text_pad_id); image holds codes in raster order,
    1 <= N <= grid**2 (a prefix of the grid is fine). text_logits (B, text_len,
    text_vocab_internal)[:, i] predicts internal text id i; image_logits (B, N, image_vocab)[:, j]
    predicts image[:, j] (image[:, -1] is a target only, never read).
    """

    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.bos_id = c.text_vocab_internal  # embedding row of BOS, after the predicted ids
        self.text_emb = Embedding(c.text_vocab_internal + 1, c.dim)  # + BOS
        self.text_pos = Embedding(c.text_len + 1, c.dim)  # BOS + text positions
        self.image_emb = Embedding(c.image_vocab, c.dim)
        self.image_row_pos = Embedding(c.image_grid, c.dim)  # added: row + column embedding
        self.image_col_pos = Embedding(c.image_grid, c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.layer_kinds = attention_schedule(c.attn_pattern, c.depth)  # mask kind per block
        self.blocks = nn.ModuleList(Block(c, kind) for kind in self.layer_kinds)
        self.ln_f = nn.LayerNorm(c.dim)
        self.text_head = Linear(c.dim, c.text_vocab_internal, bias=False)
        self.image_head = Linear(c.dim, c.image_vocab, bias=False)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block in backward (what the engine's `activation_checkpointing` asks
        for); the sparse layers then drop their own inner recompute (a checkpoint inside a
        checkpoint runs the attention forward a third time for nothing)."""
        for block in self.blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            block.attn.recompute_sparse = False

    # ---- tokens and embeddings --------------------------------------------------------------

    def internal_text(self, text: torch.Tensor) -> torch.Tensor:
        """Dataset ids (B, text_len) -> internal ids: per-position pads, "no text" for empty."""
        c = self.cfg
        if text.dim() != 2 or text.shape[1] != c.text_len:
            raise ValueError(f"text must be (B, {c.text_len}), got {tuple(text.shape)}")
        if text.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text must hold integer ids, got {text.dtype}")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= c.text_vocab):
            raise ValueError(f"text ids must be in [0, {c.text_vocab})")
        text = text.long()
        is_pad = text == c.text_pad_id  # (B, T)
        pad_ids = c.text_vocab + torch.arange(c.text_len, device=text.device)  # (T,)
        out = torch.where(is_pad, pad_ids, text)
        empty = is_pad.all(dim=1)  # (B,) captions with no tokens at all
        out[:, 0] = torch.where(empty, c.text_vocab + c.text_len, out[:, 0])
        return out

    def _embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Dataset text (B, T) -> embeddings of BOS + text at input positions 0..T: (B, T+1, C)."""
        ids = self.internal_text(text)
        bos = torch.full((ids.shape[0], 1), self.bos_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat([bos, ids], dim=1)  # (B, T+1)
        # call the modules (not `.weight`): ZeRO-3 gathers parameters in forward hooks
        pos = self.text_pos(torch.arange(ids.shape[1], device=ids.device))  # (T+1, C)
        return self.text_emb(ids) + pos  # (B, T+1, C)

    def _embed_image(self, codes: torch.Tensor, first: int) -> torch.Tensor:
        """Codes (B, S) at raster indices first..first+S-1 -> embeddings (B, S, C)."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.image_vocab):
            raise ValueError(f"image codes must be in [0, {self.cfg.image_vocab})")
        idx = torch.arange(first, first + codes.shape[1], device=codes.device)  # (S,)
        g = self.cfg.image_grid
        pos = self.image_row_pos(idx // g) + self.image_col_pos(idx % g)  # (S, C)
        return self.image_emb(codes) + pos

    # ---- training forward -------------------------------------------------------------------

    def forward(self, text: torch.Tensor, image: torch.Tensor):
        """(B, text_len) ids, (B, N) codes -> text_logits (B, T, V_text), image_logits (B, N, V_img)."""
        c = self.cfg
        if image.dim() != 2 or not 1 <= image.shape[1] <= c.image_len:
            raise ValueError(
                f"image must be (B, N) with 1 <= N <= {c.image_len}, got {tuple(image.shape)}"
            )
        if image.shape[0] != text.shape[0]:
            raise ValueError(
                f"text and image batch sizes differ: {text.shape[0]} vs {image.shape[0]}"
            )
        x = torch.cat([self._embed_text(text), self._embed_image(image[:, :-1].long(), 0)], 1)
        x = self.drop(x)  # (B, L', C), L' = T + N input positions
        for block in self.blocks:  # each block knows its mask kind (masks built as needed)
            x = block(x)
        x = self.ln_f(x)
        T = c.text_len
        # position i < T holds BOS/text i-1 and predicts text i; position T+j predicts image j
        return self.text_head(x[:, :T]), self.image_head(x[:, T:])

    # ---- incremental decoding ---------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, text: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """Run BOS + text (B, text_len) into a fresh KV cache.

        Returns (cache, logits (B, image_vocab) for image code 0); then feed codes with
        `decode_step` in raster order.
        """
        c = self.cfg
        p = self.text_emb.weight
        cache = KVCache.allocate(
            c.depth, text.shape[0], c.heads, c.seq_len, c.head_dim, device=p.device, dtype=p.dtype
        )
        x = self._embed_text(text)  # (B, T+1, C)
        logits = self._run_cached(x, cache)
        return cache, logits

    @torch.no_grad()
    def decode_step(self, code: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image code j (B,) at the cache's next position -> logits (B, image_vocab) of j+1."""
        c = self.cfg
        j = cache.pos - (c.text_len + 1)  # raster index of the code being fed
        if j < 0:
            raise ValueError("decode_step needs a cache from prefill()")
        if j >= c.image_len - 1:
            raise ValueError(f"cache is full: all {c.image_len} image codes were predicted")
        if code.dim() != 1 or code.shape[0] != cache.keys[0].shape[0]:
            raise ValueError(
                f"code must be (B,) = ({cache.keys[0].shape[0]},), got {tuple(code.shape)}"
            )
        x = self._embed_image(code.long()[:, None], j)  # (B, 1, C)
        return self._run_cached(x, cache)

    def _run_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Positions cache.pos .. +S-1 through all blocks; logits (B, V_img) of the last one."""
        start, end = cache.pos, cache.pos + x.shape[1]
        rows = {}  # kind -> mask rows (S, end) of these positions, shared by its layers
        for i, (block, kind) in enumerate(zip(self.blocks, self.layer_kinds, strict=True)):
            if kind not in rows:
                rows[kind] = block.attn.layout.rows(start, end, x.device)
            x = block(x, (cache.keys[i], cache.values[i]), start, rows[kind])
        cache.pos = start + x.shape[1]
        return self.image_head(self.ln_f(x[:, -1]))  # (B, V_img)

    # ---- accounting -------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (works on the meta device); optionally without embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per text+image token: 6 x matmul params + attention (PaLM appendix B).

        Heads are counted where they run (text head on text positions, image head on image
        positions); attention as 12 * heads * head_dim * (keys a query scores), summed over
        layers: L keys for a dense layer (the full L x L scores, as PaLM counts causal ones);
        for a sparse layer text queries score BOS + text and image queries BOS + text + their
        block window (what `sparse_attend` computes, padding included).
        """
        c = self.cfg
        block = sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2)
        heads = (c.text_len * c.text_vocab_internal + c.image_len * c.image_vocab) * c.dim
        heads /= c.text_len + c.image_len  # per-token average over the two heads
        n_text = c.text_len + 1
        keys = 0.0  # keys scored per query, summed over layers
        for blk in self.blocks:
            if blk.attn.sparse:
                win = local_window(blk.attn.layout.kind, c.image_grid, c.conv_kernel)
                window = (win.prev + 1) * c.image_grid
                keys += (n_text * n_text + c.image_len * (n_text + window)) / c.seq_len
            else:
                keys += c.seq_len
        return 6.0 * (block + heads) + 12 * c.heads * c.head_dim * keys


def compute_dalle_loss(
    text_logits: torch.Tensor,
    image_logits: torch.Tensor,
    text: torch.Tensor,
    image: torch.Tensor,
    text_weight: float = 1 / 8,
    image_weight: float = 7 / 8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the mean text and image cross-entropies (computed in fp32).

    text_logits (B, T, V_text) and text (B, T) *internal* ids (`model.internal_text`, so pads
    are per-position targets); image_logits (B, N, V_img) and image (B, N) codes.
    Returns (loss, {"loss_text", "loss_image"}) with detached metrics.
    """
    if text_logits.shape[:2] != text.shape or image_logits.shape[:2] != image.shape:
        raise ValueError(
            f"logits/targets mismatch: text {tuple(text_logits.shape)} vs {tuple(text.shape)}, "
            f"image {tuple(image_logits.shape)} vs {tuple(image.shape)}"
        )
    loss_text = F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten().long())
    loss_image = F.cross_entropy(image_logits.flatten(0, 1).float(), image.flatten().long())
    loss = text_weight * loss_text + image_weight * loss_image
    return loss, {"loss_text": loss_text.detach(), "loss_image": loss_image.detach()}


def corrupt_text(
    text: torch.Tensor, *, pad_id: int, vocab: int, insert_p: float, replace_p: float
) -> torch.Tensor:
    """Training-time caption noise: (B, T) dataset ids -> (B, T) ids, same pad convention.

    Small caption sets (the digits demo has six templates) teach a transformer to read exact token
    sequences; a prompt phrased differently (unseen words, the digit at a later position) then
    reads as noise. Two corruptions make the image depend on the caption's content tokens wherever
    they sit among tokens it cannot use:
    - insert: with probability `insert_p` a caption gets k ~ U{1..free slots} random ids inserted
      at random positions (its own tokens keep their order);
    - replace: each caption token becomes a random id with probability `replace_p`.
    Random ids are uniform over [0, vocab) without `pad_id`. Draws use the CPU generator (which
    checkpoints restore), so a resumed run corrupts exactly as the uninterrupted one.
    """
    if insert_p == 0 and replace_p == 0:
        return text
    device, text = text.device, text.cpu()
    B, T = text.shape

    def random_ids(*shape: int) -> torch.Tensor:
        ids = torch.randint(0, vocab - 1, shape, dtype=text.dtype)
        return ids + (ids >= pad_id).to(ids.dtype)  # skip pad_id

    is_tok = text != pad_id  # (B, T)
    if replace_p > 0:
        text = torch.where(is_tok & (torch.rand(B, T) < replace_p), random_ids(B, T), text)
    if insert_p > 0:
        n = is_tok.sum(1)  # (B,) tokens per caption
        free = T - n
        k = (torch.rand(B) * free).long() + 1  # 1..free
        k = torch.where((torch.rand(B) < insert_p) & (free > 0), k, 0)
        pos = torch.arange(T)
        inside = pos < (n + k)[:, None]  # (B, T) slots the corrupted caption occupies
        keys = torch.where(inside, torch.rand(B, T), 2.0)
        rank = keys.argsort(1).argsort(1)  # rank of each slot's key within its row
        own = rank < n[:, None]  # n random slots among the occupied ones hold the caption
        out = torch.full_like(text, pad_id)
        out[own] = text[is_tok]  # row-major on both sides: each caption keeps its order
        noise = inside & ~own
        out[noise] = random_ids(int(noise.sum()))
        text = out
    return text.to(device)
