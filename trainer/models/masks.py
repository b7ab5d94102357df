"""DALL-E attention masks: the paper's definitions, as pure functions.

Positions. The transformer reads one decoder-only sequence

    seq = [BOS] + text (text_len tokens) + image (grid**2 tokens, raster order)

and is fed all but its last token, so there are L = text_len + grid**2 *input positions*:

    input position p        holds            its output predicts
    0                       BOS              text token 0
    1 .. text_len           text 0 .. T-1    text 1 .. T-1, then image token 0 (at p = text_len)
    text_len + 1 + j        image token j    image token j + 1   (j = 0 .. grid**2 - 2)

Masks (Ramesh et al. 2021, appendix B.1 and its figure of the masks for 6 text tokens and a 4x4
grid) are defined on input positions by the token a position *holds*; image token j sits at grid
coordinate (j // grid, j % grid):

* BOS and text attend causally to BOS and text; every image token attends to ALL of them.
* image to image, with d = j_query - j_key >= 0 the distance back in raster order:
    - full: every earlier image token (the whole mask is plain causal);
    - row:  d <= grid: itself and the grid previous tokens, so the earliest one it sees is the
            same column one row up (the paper's "previous 5 image tokens" of a 4x4 grid: the
            extent is chosen so that the last token attended to is in the same column of the
            previous row); the band wraps around row ends like the raster order does;
    - col:  d a multiple of grid: the same column in the rows above, and itself;
    - conv: a causal k x k window (the paper: 11 x 11) with the same wrap-around as row: d is
            dr * grid + e with 0 <= dr <= k // 2 rows up and |e| <= k // 2 columns across,
            counted in raster order (so a window reaching past the left edge continues at the
            end of the row above, as the row band does).

Every mask row is a subset of the causal row, so a prefix of the sequence sees exactly what it
would see inside the full sequence; decoding position p applies row p of the layer's mask to the
cached keys 0..p, which is what makes the KV cache exact for every pattern.

Their sparse computation and the attention module are in `trainer.models.attention`.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("full", "row", "col", "conv")
ATTN_PATTERNS = ("full", "dalle", "row", "col", "conv")


def check_geometry(kind: str, text_len: int, grid: int, conv_kernel: int) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    if text_len < 1 or grid < 1:
        raise ValueError(f"text_len and grid must be >= 1, got text_len={text_len}, grid={grid}")
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")


def image_visible(
    kind: str, grid: int, conv_kernel: int, q_img: torch.Tensor, k_img: torch.Tensor
) -> torch.Tensor:
    """May image token `q_img` attend to image token `k_img`? Raster indices, broadcast -> bool.

    Depends only on the raster distance d = q_img - k_img (see the module docstring).
    """
    d = q_img - k_img
    causal = d >= 0
    if kind == "full":
        return causal
    if kind == "row":
        return causal & (d <= grid)
    if kind == "col":
        return causal & (d.remainder(grid) == 0)
    if kind != "conv":
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    half = conv_kernel // 2
    near = d.abs() <= half  # d = rows_up * grid + e, |e| <= half; out of place (vmap-safe)
    for rows_up in range(1, half + 1):
        near = near | ((d - rows_up * grid).abs() <= half)
    return causal & near


def visible(
    kind: str, text_len: int, grid: int, conv_kernel: int, q: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """May the query at input position `q` attend to the key at input position `k`? Integer
    tensors, broadcast -> bool. The one definition of every mask: `mask_rows` evaluates it on a
    grid of positions, and flex_attention's `mask_mod` (trainer.models.attention) pointwise."""
    causal = k <= q
    if kind == "full":
        return causal
    n_text = text_len + 1  # BOS + text
    related = image_visible(kind, grid, conv_kernel, q - n_text, k - n_text)
    # A text key is visible to every later query; an image key only to related image queries.
    return causal & ((k < n_text) | ((q >= n_text) & related))


def mask_rows(
    kind: str,
    text_len: int,
    grid: int,
    conv_kernel: int = 11,
    start: int = 0,
    end: int | None = None,
    device=None,
) -> torch.Tensor:
    """Rows start..end-1 of the (L, L) mask, keys 0..end-1: bool (end - start, end).

    True = query (row) may attend to key (column). `end` defaults to L = text_len + grid**2.
    """
    check_geometry(kind, text_len, grid, conv_kernel)
    length = text_len + grid * grid
    end = length if end is None else end
    if not 0 <= start <= end <= length:
        raise ValueError(f"need 0 <= start <= end <= L={length}, got start={start}, end={end}")
    q = torch.arange(start, end, device=device)[:, None]  # (S, 1) query positions
    k = torch.arange(end, device=device)[None, :]  # (1, end) key positions
    return visible(kind, text_len, grid, conv_kernel, q, k)  # (S, end)


def build_attention_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, device=None
) -> torch.Tensor:
    """Dense boolean (L, L) mask over input positions, True = query (row) may attend to key.

    L = 1 + text_len + grid**2 - 1 (BOS + text + all image tokens but the last); see the module
    docstring for what each position holds. `conv_kernel` (odd) is used by kind "conv" only.
    The reference for the sparse path; the sparse path never builds it.
    """
    return mask_rows(kind, text_len, grid, conv_kernel, device=device)


def attention_schedule(pattern: str, depth: int) -> list[str]:
    """The mask kind of each layer for a model-level `attn_pattern`.

    "dalle" is the paper's schedule: counting layers from 1, layer i uses column attention if
    (i - 2) mod 4 == 0 (layers 2, 6, 10, ...), row attention otherwise, and the last layer uses
    convolutional attention. The other patterns use their own kind in every layer.
    """
    if pattern not in ATTN_PATTERNS:
        raise ValueError(f"attn_pattern must be one of {ATTN_PATTERNS}, got {pattern!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if pattern != "dalle":
        return [pattern] * depth
    kinds = ["col" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]
    kinds[-1] = "conv"
    return kinds
