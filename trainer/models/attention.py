"""DALL-E attention: sparse mask construction (pure functions) and self-attention with a KV cache.

Positions. The transformer reads one decoder-only sequence

    seq = [BOS] + text (text_len tokens) + image (grid**2 tokens, raster order)

and is fed all but its last token, so there are L = text_len + grid**2 *input positions*:

    input position p        holds            its output predicts
    0                       BOS              text token 0
    1 .. text_len           text 0 .. T-1    text 1 .. T-1, then image token 0 (at p = text_len)
    text_len + 1 + j        image token j    image token j + 1   (j = 0 .. grid**2 - 2)

Masks are defined on input positions by the token a position *holds* ("image token j" is the one at
input position text_len + 1 + j, with grid coordinate (j // grid, j % grid)):

* BOS and text attend causally to BOS and text.
* every image token attends to ALL text positions (BOS included) and to itself, plus
    - full: every earlier image token (the whole mask is plain causal),
    - row:  earlier image tokens in the same grid row,
    - col:  earlier image tokens in the same grid column,
    - conv: earlier image tokens in the k x k window centred on it.

Every mask row is a subset of the causal row, so a prefix of the sequence sees exactly what it
would see inside the full sequence: `mask[:n, :n]` is the mask of the first n positions. That is
what makes the KV cache exact for every pattern: decoding position p applies row p of the layer's
own mask to the cached keys 0..p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MASK_KINDS = ("full", "row", "col", "conv")
ATTN_PATTERNS = ("full", "dalle", "row", "col", "conv")
AttnImpl = Literal["auto", "sdpa", "matmul"]


def build_attention_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, device=None
) -> torch.Tensor:
    """Boolean (L, L) mask over input positions, True = query (row) may attend to key (column).

    L = 1 + text_len + grid**2 - 1 (BOS + text + all image tokens but the last); see the module
    docstring for what each position holds. `conv_kernel` (odd) is used by kind "conv" only.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    if text_len < 1 or grid < 1:
        raise ValueError(f"text_len and grid must be >= 1, got text_len={text_len}, grid={grid}")
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")
    n_text = text_len + 1  # BOS + text
    length = text_len + grid * grid
    pos = torch.arange(length, device=device)  # (L,)
    causal = pos[:, None] >= pos[None, :]  # (L, L)
    if kind == "full":
        return causal
    img = pos - n_text  # raster index of the image token held; negative for BOS/text
    is_img = img >= 0
    row, col = img.div(grid, rounding_mode="floor"), img.remainder(grid)  # valid where is_img
    if kind == "row":
        related = row[:, None] == row[None, :]
    elif kind == "col":
        related = col[:, None] == col[None, :]
    else:  # conv: a k x k window centred on the query (the causal part cuts it in half)
        half = conv_kernel // 2
        related = ((row[:, None] - row[None, :]).abs() <= half) & (
            (col[:, None] - col[None, :]).abs() <= half
        )
    # A text key is visible to every later query; an image key only to related image queries.
    return causal & (~is_img[None, :] | (is_img[:, None] & related))


def attention_schedule(pattern: str, depth: int) -> list[str]:
    """The mask kind of each layer for a model-level `attn_pattern`.

    "dalle" is the DALL-E schedule: layer i uses column attention if i % 4 == 2, row attention
    otherwise, and the last layer uses convolutional attention. The other patterns use their own
    kind in every layer.
    """
    if pattern not in ATTN_PATTERNS:
        raise ValueError(f"attn_pattern must be one of {ATTN_PATTERNS}, got {pattern!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if pattern != "dalle":
        return [pattern] * depth
    kinds = ["col" if i % 4 == 2 else "row" for i in range(depth)]
    kinds[-1] = "conv"
    return kinds


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
    """Masked scaled-dot-product attention. q (B, H, S, D), k and v (B, H, Lk, D) -> (B, H, S, D).

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


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and an optional KV cache.

    forward(x (B, S, C), mask (L, L) bool, cache=None, start=0) -> (B, S, C): `x` holds input
    positions start .. start+S-1; the full-length `mask` is sliced to those rows. With a cache,
    the new keys/values are written at those positions and the queries attend to positions
    0 .. start+S-1 of the cache; without one, start must be 0.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        depth: int,
        dropout: float = 0.0,
        impl: AttnImpl = "auto",
    ):
        super().__init__()
        self.heads, self.head_dim, self.dropout, self.impl = heads, head_dim, dropout, impl
        inner = heads * head_dim
        self.qkv = Linear(dim, 3 * inner)  # q, k, v of all heads in one matmul
        # GPT-2: residual projections scaled by 1/sqrt(2 * depth) (two per block)
        self.proj = Linear(inner, dim, std=0.02 / math.sqrt(2 * depth))
        self.resid_drop = nn.Dropout(dropout)

    def _impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        return "matmul" if x.device.type == "cpu" else "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: tuple | None = None,
        start: int = 0,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        H, D = self.heads, self.head_dim
        # (B, S, 3*H*D) -> 3 x (B, H, S, D)
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        end = start + S
        if cache is not None:
            k_buf, v_buf = cache  # (B, H, L, D) each, preallocated
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, H, end, D)
        elif start != 0:
            raise ValueError("start must be 0 without a cache")
        rows = mask[start:end, :end]  # (S, end): this layer's mask rows for these positions
        y = attend(
            q,
            k,
            v,
            rows,
            impl=self._impl(x),
            is_causal=is_causal and cache is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, S, H * D)  # (B, S, H*D)
        return self.resid_drop(self.proj(y))
