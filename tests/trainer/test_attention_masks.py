"""DALL-E attention masks against an independent brute-force construction, and attention kernels
against an explicit masked softmax."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from trainer.models.attention import (
    MASK_KINDS,
    SelfAttention,
    attend,
    attention_schedule,
    build_attention_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 4, 3), (5, 5, 5), (2, 3, 1), (4, 6, 3)]  # (text_len, grid, conv_kernel)


def brute_force_mask(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    """Written from the rules, position by position (independent of the vectorised builder).

    Input positions: 0 = BOS, 1..text_len = text, then image token (r, c) at
    text_len + 1 + r * grid + c for every raster index except the last one.
    """
    n_text = text_len + 1
    length = text_len + grid * grid
    allowed = torch.zeros(length, length, dtype=torch.bool)
    coords = {}  # input position -> (row, col) of the image token it holds
    for r in range(grid):
        for c in range(grid):
            p = n_text + r * grid + c
            if p < length:
                coords[p] = (r, c)
    for q in range(length):
        for k in range(q + 1):  # never the future
            if k < n_text:  # BOS/text keys: seen by every later query (text or image)
                allowed[q, k] = True
                continue
            if q < n_text:  # text queries never see image keys (they come later anyway)
                continue
            (qr, qc), (kr, kc) = coords[q], coords[k]
            if kind == "full":
                ok = True
            elif kind == "row":
                ok = qr == kr
            elif kind == "col":
                ok = qc == kc
            else:
                ok = abs(qr - kr) <= kernel // 2 and abs(qc - kc) <= kernel // 2
            allowed[q, k] = ok
    return allowed


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("text_len,grid,kernel", SHAPES)
def test_mask_matches_brute_force(kind, text_len, grid, kernel):
    mask = build_attention_mask(kind, text_len, grid, kernel)
    assert mask.dtype == torch.bool and mask.shape == (text_len + grid**2,) * 2
    assert torch.equal(mask, brute_force_mask(kind, text_len, grid, kernel))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_invariants(kind):
    text_len, grid = 5, 6
    mask = build_attention_mask(kind, text_len, grid, 5)
    n_text = text_len + 1
    assert not (mask & ~torch.ones_like(mask).tril()).any(), "a position sees the future"
    assert mask.diagonal().all(), "every position sees itself"
    assert mask[n_text:, :n_text].all(), "every image position sees all text and BOS"
    assert torch.equal(mask[:n_text, :n_text], torch.ones(n_text, n_text).tril().bool())


def test_full_is_causal_and_patterns_differ():
    full = build_attention_mask("full", 4, 4)
    assert torch.equal(full, torch.ones_like(full).tril())  # what licenses is_causal=True
    masks = [build_attention_mask(k, 4, 4, 3) for k in MASK_KINDS]
    for i in range(len(masks)):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j]), (MASK_KINDS[i], MASK_KINDS[j])


def test_conv_window_example():
    # grid 4, kernel 3: the token at (2, 2) sees (1,1) (1,2) (1,3) (2,1) and itself
    text_len, grid = 2, 4
    mask = build_attention_mask("conv", text_len, grid, 3)
    p = text_len + 1 + 2 * grid + 2
    seen = {(i // grid, i % grid) for i in range(grid * grid - 1) if mask[p, text_len + 1 + i]}
    assert seen == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind"):
        build_attention_mask("diagonal", 4, 4)
    with pytest.raises(ValueError, match="conv_kernel"):
        build_attention_mask("conv", 4, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        build_attention_mask("row", 4, 0)


def test_dalle_schedule():
    assert attention_schedule("dalle", 8) == [
        "row",
        "row",
        "col",
        "row",
        "row",
        "row",
        "col",
        "conv",
    ]
    assert attention_schedule("dalle", 1) == ["conv"]
    assert attention_schedule("col", 3) == ["col"] * 3
    with pytest.raises(ValueError, match="attn_pattern"):
        attention_schedule("axial", 4)


def reference_attention(q, k, v, mask):
    """Explicit masked softmax in fp32: the definition both kernels must match."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_attend_matches_reference(kind, impl):
    g = torch.Generator().manual_seed(0)
    mask = build_attention_mask(kind, 3, 4, 3)
    L = mask.shape[0]
    q, k, v = (torch.randn(2, 3, L, 8, generator=g) for _ in range(3))
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(attend(q, k, v, mask, impl=impl), ref, atol=1e-5, rtol=0)
    if kind == "full":  # the causal fast path equals the explicit mask
        out = attend(q, k, v, mask, impl=impl, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # gradients agree too (the matmul path is the CPU training path)
    q.requires_grad_(True)
    (attend(q, k, v, mask, impl=impl) * v).sum().backward()
    grad = q.grad.clone()
    q.grad = None
    (reference_attention(q, k, v, mask) * v).sum().backward()
    torch.testing.assert_close(grad, q.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_attention_module_matches_reference(impl):
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, 8, depth=2, impl=impl)
    mask = build_attention_mask("conv", 3, 4, 3)
    x = torch.randn(2, mask.shape[0], 16)
    q, k, v = attn.qkv(x).view(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
    y = reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, -1, 16)
    torch.testing.assert_close(attn(x, mask), attn.proj(y), atol=1e-5, rtol=0)


def test_model_files_import_no_distributed_code():
    banned = {"torch.distributed", "deepspeed", "ray"}
    root = Path(__file__).resolve().parents[2] / "trainer" / "models"
    for name in ("attention.py", "dalle.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert not any(mod == b or mod.startswith(b + ".") for b in banned), (name, mod)
