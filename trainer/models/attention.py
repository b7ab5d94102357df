"""DALL-E attention: the sparse computation of the paper's masks (`trainer.models.masks`)
and self-attention with a KV cache.

Sparse computation (`sparse_attend`). row and conv allow a fixed set of raster distances d, all
below (nb + 1) * grid; so the image queries of grid row r need keys from rows r - nb .. r only:
queries are blocked by grid row and each block attends to a window of (nb + 1) * grid keys
(nb = 1 for row, k // 2 + 1 for conv) plus all text keys, under one small (grid, (nb+1)*grid)
mask shared by every block. col transposes the image states first (the paper's trick), so a
column becomes a block and col is a causal mask inside each block. Work and memory are
O(L * (text_len + window)) per layer; no (L, L) tensor exists. `build_attention_mask` gives the
dense (L, L) masks, the reference the sparse path is tested against (and what impl "sdpa" /
"matmul" use).

Which computation impl "auto" picks for a row/col/conv layer in training (no KV cache):

    CUDA, no attention dropout   `flex_attention` (compiled) with a BlockMask built from the same
                                 mask definition (`masks.visible` as its `mask_mod`): fused, with
                                 a CUDA backward, skipping fully masked blocks. (In torch 2.14.1
                                 flex_attention has no backward on CPU, eager or compiled.)
    S <= DENSE_MAX_POSITIONS     the dense (S, S) boolean mask, one fused masked attention: at
                                 short lengths the blockwise bookkeeping costs more than the
                                 masked-out work it saves (the digits demo, 88 positions, 2 CPU
                                 cores, bf16: see `DENSE_MAX_POSITIONS`). Mathematically identical.
    longer                       `sparse_attend`, blockwise, O(L * window) memory (the paper's
                                 1280 positions and up).

impl "sparse" always computes blockwise (the memory reference).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.masks import check_geometry, image_visible, mask_rows, visible

ATTN_IMPLS = ("auto", "sparse", "sdpa", "matmul")
AttnImpl = Literal["auto", "sparse", "sdpa", "matmul"]

# impl "auto" computes a sparse layer of at most this many input positions with its dense (S, S)
# mask (module docstring). 1024 keeps every mask at <= 1 Mi booleans and the scores at
# B * H * 1 Mi elements; the paper's sequence (256 text + 32 x 32 image = 1280) stays blockwise,
# and so does 64 + 32 x 32 = 1088, where docs/benchmarks.md measured blockwise 1.2-1.7x faster
# than dense. Below it dense was faster (2026-12-06, 2 cores under other load, bf16, one row
# layer 8 x 64 heads, B=4, forward + backward, best of 8: 320 positions 245 vs 509 ms blockwise,
# 640: 293 vs 532 ms, 964: 533 vs 989 ms; the digits demo's training step: see the commit log).
DENSE_MAX_POSITIONS = 1024


def flex_mask_mod(kind: str, text_len: int, grid: int, conv_kernel: int):
    """flex_attention's `mask_mod(b, h, q_idx, kv_idx) -> bool` of a sparse kind: the paper's
    mask, pointwise (`masks.visible`, the function `mask_rows` evaluates densely)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(kind, text_len, grid, conv_kernel, q_idx, kv_idx)

    return mask_mod


@functools.lru_cache(maxsize=64)
def flex_block_mask(kind: str, text_len: int, grid: int, conv_kernel: int, S: int, device: str):
    """The BlockMask of `kind` over S positions on `device` (built once per shape and device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = flex_mask_mod(kind, text_len, grid, conv_kernel)
    return create_block_mask(mask_mod, None, None, S, S, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    """flex_attention compiled once per process: its eager form is a slow reference."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q, k, v, kind: str, text_len: int, grid: int, conv_kernel: int) -> torch.Tensor:
    """Sparse attention on CUDA: q, k, v (B, H, S, D) -> (B, H, S, D) under `kind`'s BlockMask."""
    S = q.shape[2]
    block_mask = flex_block_mask(kind, text_len, grid, conv_kernel, S, str(q.device))
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    impl: str = "sdpa",
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense masked scaled-dot-product attention. q (B, H, S, D), k and v (B, H, Lk, D) ->
    (B, H, S, D).

    `mask` is boolean (S, Lk), True = may attend; every row must allow at least one key.
    impl "sdpa" calls `F.scaled_dot_product_attention` with the boolean mask (or `is_causal=True`
    when the caller knows the mask is the plain lower triangle with S == Lk). impl "matmul" is
    the explicit form (scores + additive -inf bias, softmax, weighted sum). On CPU the explicit
    form trains faster: SDPA's CPU flash kernel has a slow backward (2 cores, bf16, B=4, 12 heads
    x 64, 320 positions: forward+backward ~37 ms explicit vs ~55 ms SDPA, bool or float mask).
    On GPUs SDPA's fused kernels win and never materialise the (S, Lk) scores.
    """
    if impl == "sdpa":
        if is_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl != "matmul":
        raise ValueError(f"impl must be 'sdpa' or 'matmul', got {impl!r}")
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)  # (S, Lk)
    bias.masked_fill_(~mask, float("-inf"))
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))  # (B,H,S,Lk)
    scores.add_(bias)  # in place: matmul's backward does not need its output
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # (B, H, S, D)


@dataclass(frozen=True)
class LocalWindow:
    """How `sparse_attend` blocks the image part of one sparse mask kind."""

    prev: int  # earlier blocks each block of queries reads: window = (prev + 1) * grid keys
    transposed: bool  # blocks are grid columns (image states transposed), else grid rows


def local_window(kind: str, grid: int, conv_kernel: int) -> LocalWindow:
    """The block window of a sparse kind: every visible raster distance d is < (prev+1)*grid."""
    if kind == "row":  # d <= grid: this row and the one above
        return LocalWindow(prev=1, transposed=False)
    if kind == "col":  # transposed, a column is one block: causal inside it
        return LocalWindow(prev=0, transposed=True)
    if kind == "conv":  # d <= half * grid + half
        half = conv_kernel // 2
        return LocalWindow(prev=-(-(half * grid + half) // grid), transposed=False)
    raise ValueError(f"sparse attention needs kind 'row', 'col' or 'conv', got {kind!r}")


def local_mask(kind: str, grid: int, conv_kernel: int, device=None) -> torch.Tensor:
    """Bool (grid, grid, W): may query a of block b see key w of its window? W = (prev+1)*grid.

    Window key w of block b is image block b - prev + w // grid (before the image: never).
    """
    win = local_window(kind, grid, conv_kernel)
    width = (win.prev + 1) * grid
    a = torch.arange(grid, device=device)[:, None]  # (grid, 1) query index in its block
    w = torch.arange(width, device=device)[None, :]  # (1, W) key index in the window
    if win.transposed:  # same column, rows up to the query's own
        local = w <= a
    else:  # raster indices: query b*grid + a, key (b - prev)*grid + w
        local = image_visible(kind, grid, conv_kernel, win.prev * grid + a, w)  # (grid, W)
    blocks = torch.arange(grid, device=device)[:, None]  # (grid, 1)
    exists = blocks - win.prev + w // grid >= 0  # (grid, W): the key's block is in the image
    return local[None] & exists[:, None, :]  # (grid, grid, W)


def sparse_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    text_len: int,
    grid: int,
    conv_kernel: int = 11,
    *,
    text_impl: str = "matmul",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention under sparse mask `kind` (row, col, conv) computed blockwise, never (S, S).

    q, k, v (B, H, S, D) hold input positions 0..S-1, text_len + 1 <= S <= L -> (B, H, S, D).
    Equals `attend(q, k, v, build_attention_mask(kind, ...)[:S, :S])` up to rounding. Text
    queries use dense causal attention (`text_impl`) over BOS + text; image queries score all
    text keys plus their block's window (module docstring) under one softmax.
    """
    B, H, S, D = q.shape
    n_text, n_grid = text_len + 1, grid * grid
    if not n_text <= S <= text_len + n_grid:
        raise ValueError(f"need {n_text} <= S <= {text_len + n_grid} positions, got {S}")
    win = local_window(kind, grid, conv_kernel)
    kt, vt = k[:, :, :n_text], v[:, :, :n_text]  # (B, H, T1, D)
    causal = torch.ones(n_text, n_text, dtype=torch.bool, device=q.device).tril()
    out_text = attend(
        q[:, :, :n_text], kt, vt, causal, impl=text_impl, is_causal=True, dropout_p=dropout_p
    )
    n_img = S - n_text
    if n_img == 0:
        return out_text

    def blocks(x: torch.Tensor) -> torch.Tensor:
        # (B, H, n_img, D) -> (B, H, grid, grid, D): zero-padded to the full grid, one block per
        # grid row (or column when transposed). Padding comes after every real position, so
        # the masks never let a real query see it; padded queries are dropped at the end.
        x = F.pad(x, (0, 0, 0, n_grid - n_img)).view(B, H, grid, grid, D)
        return x.transpose(2, 3).contiguous() if win.transposed else x

    def windows(x: torch.Tensor) -> torch.Tensor:
        # (B, H, grid, grid, D) -> (B, H, grid, W, D): block b reads blocks b-prev..b. One
        # copy through an unfold view: 3x cheaper forward+backward than concatenating prev+1
        # shifted slices (2 cores, bf16, conv 11x11 on a 32x32 grid: 36 vs 103 ms).
        if win.prev == 0:
            return x
        x = F.pad(x, (0, 0, 0, 0, win.prev, 0))  # prev empty blocks before the image
        x = x.unfold(2, win.prev + 1, 1)  # (B, H, grid, grid, D, prev+1), a view
        return x.permute(0, 1, 2, 5, 3, 4).reshape(B, H, grid, (win.prev + 1) * grid, D)

    qb = blocks(q[:, :, n_text:]) * (1.0 / math.sqrt(D))  # (B, H, grid, grid, D)
    kw = windows(blocks(k[:, :, n_text:]))  # (B, H, grid, W, D)
    vw = windows(blocks(v[:, :, n_text:]))
    width = kw.shape[3]
    s_text = torch.matmul(qb.view(B, H, n_grid, D), kt.transpose(-1, -2))  # (B, H, G2, T1)
    s_local = torch.matmul(qb, kw.transpose(-1, -2))  # (B, H, grid, grid, W)
    # in place: matmul's backward does not need its output
    s_local.masked_fill_(~local_mask(kind, grid, conv_kernel, q.device), float("-inf"))
    scores = torch.cat([s_text.view(B, H, grid, grid, n_text), s_local], dim=-1)
    probs = scores.softmax(dim=-1)  # one softmax over text + window keys
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    p_text, p_local = probs.split([n_text, width], dim=-1)
    out = torch.matmul(p_text.reshape(B, H, n_grid, n_text), vt).view(B, H, grid, grid, D)
    out = out + torch.matmul(p_local, vw)  # (B, H, grid, grid, D)
    if win.transposed:
        out = out.transpose(2, 3)
    out = out.reshape(B, H, n_grid, D)[:, :, :n_img]
    return torch.cat([out_text, out], dim=2)  # (B, H, S, D)


@functools.lru_cache(maxsize=64)
def _dense_mask(layout: SeqLayout, S: int, device: str) -> torch.Tensor:
    return layout.rows(0, S, device)


def dense_mask(layout: SeqLayout, S: int, device: torch.device) -> torch.Tensor:
    """The layer's bool (S, S) mask on `device`, built once per length and device."""
    return _dense_mask(layout, S, str(device))


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated at full length.

    `keys[i]` and `values[i]` are (B, H, L, D) for layer i; positions [0, pos) are filled. The
    next call writes at input position `pos` and attends with row `pos` of the layer's mask.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: int = 0  # number of input positions already written (= the next input position)

    @classmethod
    def allocate(
        cls,
        depth: int,
        batch: int,
        heads: int,
        length: int,
        head_dim: int,
        *,
        device=None,
        dtype=None,
    ) -> KVCache:
        """Zero-filled cache for `depth` layers of `heads` x `head_dim` over `length` positions."""
        shape = (batch, heads, length, head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)],
        )

    @property
    def length(self) -> int:
        """Input positions the cache can hold."""
        return self.keys[0].shape[2]


class Linear(nn.Linear):
    """nn.Linear initialised N(0, std) with a zero bias inside its own __init__.

    Initialising here rather than from a model-level `apply()` matters under DeepSpeed ZeRO-3
    `zero.Init`: it partitions a module's parameters as soon as that module's __init__ returns,
    so a later model-wide init would see empty tensors and silently do nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        std: float = 0.02,
        device=None,
        dtype=None,
    ):
        self.init_std = std  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


@dataclass(frozen=True)
class SeqLayout:
    """The sequence one attention layer reads and its mask kind (module docstring)."""

    kind: str  # one of MASK_KINDS
    text_len: int  # text tokens (BOS comes on top)
    grid: int  # side of the image grid
    conv_kernel: int = 11  # odd side of the conv window (kind "conv" only)

    def __post_init__(self):
        check_geometry(self.kind, self.text_len, self.grid, self.conv_kernel)

    def rows(self, start: int, end: int, device=None) -> torch.Tensor:
        """Mask rows start..end-1 over keys 0..end-1: bool (end - start, end)."""
        return mask_rows(
            self.kind, self.text_len, self.grid, self.conv_kernel, start, end, device=device
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, one mask kind and a KV cache.

    forward(x (B, S, C), cache=None, start=0, rows=None) -> (B, S, C): `x` holds input positions
    start .. start+S-1. With a cache, the new keys/values are written at those positions and the
    queries attend to positions 0 .. start+S-1 of the cache under mask `rows` (S, start+S)
    (computed from the layout when not given); without one, start must be 0.

    impl: "auto" computes row/col/conv layers with flex_attention on CUDA, their dense mask up
    to DENSE_MAX_POSITIONS, else `sparse_attend` (module docstring); "sparse" always with
    `sparse_attend`; full layers dense (SDPA's causal kernel on GPU, the explicit form on CPU);
    "sdpa"/"matmul" use the dense (L, L) mask for every kind (the reference).

    `recompute_sparse`: `sparse_attend` recomputes its blockwise intermediates in backward
    (a checkpoint around it). Off when the whole block is already checkpointed
    (`DalleTransformer.enable_activation_checkpointing`): a checkpoint inside a checkpoint
    would run the attention forward three times per step instead of two.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        depth: int,
        layout: SeqLayout,
        dropout: float = 0.0,
        impl: AttnImpl = "auto",
    ):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.heads, self.head_dim, self.dropout, self.impl = heads, head_dim, dropout, impl
        self.layout = layout
        inner = heads * head_dim
        self.qkv = Linear(dim, 3 * inner)  # q, k, v of all heads in one matmul
        # GPT-2: residual projections scaled by 1/sqrt(2 * depth) (two per block)
        self.proj = Linear(inner, dim, std=0.02 / math.sqrt(2 * depth))
        self.resid_drop = nn.Dropout(dropout)
        self.recompute_sparse = True

    @property
    def sparse(self) -> bool:
        """Does training compute this layer blockwise (no (L, L) mask)?"""
        return self.impl in ("auto", "sparse") and self.layout.kind != "full"

    def _dense_impl(self, x: torch.Tensor) -> str:
        if self.impl in ("sdpa", "matmul"):
            return self.impl
        return "matmul" if x.device.type == "cpu" else "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple | None = None,
        start: int = 0,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        H, D = self.heads, self.head_dim
        lay = self.layout
        # (B, S, 3*H*D) -> 3 x (B, H, S, D)
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        end = start + S
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            k_buf, v_buf = cache  # (B, H, L, D) each, preallocated
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, H, end, D)
            rows = lay.rows(start, end, x.device) if rows is None else rows  # (S, end)
            y = attend(q, k, v, rows, impl=self._dense_impl(x), dropout_p=dropout_p)
        elif start != 0:
            raise ValueError("start must be 0 without a cache")
        elif self.sparse and self.impl == "auto" and x.is_cuda and dropout_p == 0.0:
            y = flex_attend(q, k, v, lay.kind, lay.text_len, lay.grid, lay.conv_kernel)
        elif self.sparse and self.impl == "auto" and S <= DENSE_MAX_POSITIONS:
            y = attend(q, k, v, dense_mask(lay, S, x.device), impl=self._dense_impl(x),
                       dropout_p=dropout_p)  # fmt: skip
        elif self.sparse:
            attn = functools.partial(
                sparse_attend,
                kind=lay.kind,
                text_len=lay.text_len,
                grid=lay.grid,
                conv_kernel=lay.conv_kernel,
                text_impl=self._dense_impl(x),
                dropout_p=dropout_p,
            )
            if self.recompute_sparse and torch.is_grad_enabled() and q.requires_grad:
                # Recompute the blockwise scores, probabilities and key windows in backward
                # (as fused attention kernels do) instead of keeping them: only q, k, v stay.
                # RNG state is saved only when dropout draws from it.
                y = checkpoint(attn, q, k, v, use_reentrant=False, preserve_rng_state=dropout_p > 0)
            else:
                y = attn(q, k, v)
        else:
            y = attend(
                q,
                k,
                v,
                lay.rows(0, S, x.device),  # (S, S)
                impl=self._dense_impl(x),
                is_causal=lay.kind == "full",
                dropout_p=dropout_p,
            )
        y = y.transpose(1, 2).reshape(B, S, H * D)  # (B, S, H*D)
        return self.resid_drop(self.proj(y))
