"""DALL-E attention masks against the paper (Ramesh et al. 2021, appendix B.1), the sparse
computation against the dense-mask reference, and the dense kernels against an explicit softmax.

The paper's text, which these tests encode without reading our builder: every image token
attends to all text tokens; text is causal; row attention lets an image token see the previous
image tokens in raster order up to the one in the same column of the previous row (extent 5 on a
4x4 grid); column attention sees the same column in the rows above; convolutional attention is a
causal k x k window (11 x 11; 3 x 3 in the paper's 4x4 figure) with the same wrap-around as row
attention. Layers counted from 1 use column attention where (i - 2) mod 4 == 0, row attention
elsewhere, and convolutional attention in the last layer.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.models.attention import SelfAttention, SeqLayout, attend, sparse_attend
from trainer.models.masks import MASK_KINDS, attention_schedule, build_attention_mask, mask_rows

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the paper's worked example, written out by hand ------------------------------------------
# 6 text tokens and a 4x4 grid. Input positions: 0 = BOS, 1..6 = text, 7..21 = image tokens 0..14
# (image token 15 is a target only). Row p is the query at position p, column the key; 1 = may
# attend ("|" separates BOS + text from image keys for reading). The first 7 rows are the causal
# text block; image rows see all 7 text positions.
TEXT_ROWS = [
    "1000000000000000000000",
    "1100000000000000000000",
    "1110000000000000000000",
    "1111000000000000000000",
    "1111100000000000000000",
    "1111110000000000000000",
    "1111111000000000000000",
]
# image token j sees itself and the 4 before it in raster order: j-4 is the same column, one up
ROW_IMAGE = [
    "1111111|100000000000000",
    "1111111|110000000000000",
    "1111111|111000000000000",
    "1111111|111100000000000",
    "1111111|111110000000000",
    "1111111|011111000000000",
    "1111111|001111100000000",
    "1111111|000111110000000",
    "1111111|000011111000000",
    "1111111|000001111100000",
    "1111111|000000111110000",
    "1111111|000000011111000",
    "1111111|000000001111100",
    "1111111|000000000111110",
    "1111111|000000000011111",
]
# image token j sees j, j-4, j-8, j-12 (same column, rows above)
COL_IMAGE = [
    "1111111|100000000000000",
    "1111111|010000000000000",
    "1111111|001000000000000",
    "1111111|000100000000000",
    "1111111|100010000000000",
    "1111111|010001000000000",
    "1111111|001000100000000",
    "1111111|000100010000000",
    "1111111|100010001000000",
    "1111111|010001000100000",
    "1111111|001000100010000",
    "1111111|000100010001000",
    "1111111|100010001000100",
    "1111111|010001000100010",
    "1111111|001000100010001",
]
# 3x3 causal window with wrap-around: the row above (left, same, right column), the left
# neighbour and itself; j-3, j-4, j-5, j-1, j in raster order (wrapping across row ends)
CONV_IMAGE = [
    "1111111|100000000000000",
    "1111111|110000000000000",
    "1111111|011000000000000",
    "1111111|101100000000000",
    "1111111|110110000000000",
    "1111111|111011000000000",
    "1111111|011101100000000",
    "1111111|001110110000000",
    "1111111|000111011000000",
    "1111111|000011101100000",
    "1111111|000001110110000",
    "1111111|000000111011000",
    "1111111|000000011101100",
    "1111111|000000001110110",
    "1111111|000000000111011",
]


def as_mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.replace("|", "")] for r in rows])


@pytest.mark.parametrize(
    "kind,image_rows", [("row", ROW_IMAGE), ("col", COL_IMAGE), ("conv", CONV_IMAGE)]
)
def test_paper_example_6_text_4x4_grid(kind, image_rows):
    expected = as_mask(TEXT_ROWS + image_rows)
    assert expected.shape == (22, 22)
    mask = build_attention_mask(kind, text_len=6, grid=4, conv_kernel=3)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected), (mask.int() - expected.int()).nonzero().tolist()


def test_paper_example_full_is_plain_causal():
    assert torch.equal(build_attention_mask("full", 6, 4), torch.ones(22, 22).tril().bool())


# ---- properties on larger grids ---------------------------------------------------------------


def image_sets(kind: str, text_len: int, grid: int, kernel: int) -> list[set[int]]:
    """For each fed image token j, the image tokens it may attend to (raster indices)."""
    mask = build_attention_mask(kind, text_len, grid, kernel)
    n = text_len + 1
    return [set(mask[n + j, n:].nonzero().flatten().tolist()) for j in range(grid * grid - 1)]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("text_len,grid,kernel", [(5, 8, 5), (3, 7, 3), (16, 32, 11)])
def test_text_causal_and_every_image_token_sees_all_text(kind, text_len, grid, kernel):
    mask = build_attention_mask(kind, text_len, grid, kernel)
    n, length = text_len + 1, text_len + grid * grid
    assert mask.shape == (length, length)
    assert not mask.triu(1).any(), "a position sees the future"
    assert mask.diagonal().all(), "every position sees itself"
    assert mask[n:, :n].all(), "every image position sees all text and BOS"
    assert torch.equal(mask[:n, :n], torch.ones(n, n).tril().bool())


@pytest.mark.parametrize("grid", [5, 8, 32])
def test_row_last_visible_is_same_column_one_row_up(grid):
    for j, seen in enumerate(image_sets("row", 4, grid, 11)):
        r, c = divmod(j, grid)
        earliest = min(seen)
        if r == 0:
            assert earliest == 0  # nothing above: back to the first token
        else:
            assert divmod(earliest, grid) == (r - 1, c)
        assert seen == set(range(earliest, j + 1)), "a contiguous run in raster order"
        assert len(seen) == min(j, grid) + 1  # itself + the grid previous tokens


@pytest.mark.parametrize("grid", [5, 8, 32])
def test_col_sees_exactly_the_column_above(grid):
    for j, seen in enumerate(image_sets("col", 4, grid, 11)):
        r, c = divmod(j, grid)
        assert seen == {rr * grid + c for rr in range(r + 1)}


@pytest.mark.parametrize("grid,kernel", [(8, 5), (32, 11), (9, 3)])
def test_conv_is_a_causal_window_with_row_wraparound(grid, kernel):
    h = kernel // 2
    for j, seen in enumerate(image_sets("conv", 4, grid, kernel)):
        r, c = divmod(j, grid)
        # the causal half of the k x k window centred on (r, c), columns counted in raster order
        # (a column past an edge continues on the neighbouring row, as row attention wraps)
        want = set()
        for dr in range(h + 1):
            for e in range(-h, h + 1):
                if dr == 0 and e > 0:
                    continue  # the future half of the query's own row
                m = (r - dr) * grid + (c + e)
                if 0 <= m <= j:
                    want.add(m)
        assert seen == want, (r, c)
        assert max(seen) == j and len(seen) <= h * kernel + h + 1
        if h <= c < grid - h and r >= h:  # away from the edges: the plain geometric window
            rows_cols = {divmod(m, grid) for m in seen}
            assert all(0 <= r - rr <= h and abs(cc - c) <= h for rr, cc in rows_cols)
            assert len(seen) == h * kernel + h + 1
    # the wrap: the first token of a row sees the end of the row above (like row attention)
    j = 2 * grid
    assert {j - 1, j - h} <= image_sets("conv", 4, grid, kernel)[j]


def test_mask_rows_are_slices_of_the_full_mask():
    for kind in MASK_KINDS:
        full = build_attention_mask(kind, 5, 6, 5)
        for start, end in [(0, 6), (3, 9), (20, 21), (0, full.shape[0]), (12, 30)]:
            got = mask_rows(kind, 5, 6, 5, start, end)
            assert torch.equal(got, full[start:end, :end]), (kind, start, end)


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind"):
        build_attention_mask("diagonal", 4, 4)
    with pytest.raises(ValueError, match="conv_kernel"):
        build_attention_mask("conv", 4, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        build_attention_mask("row", 4, 0)
    with pytest.raises(ValueError, match="start"):
        mask_rows("row", 4, 4, 3, 5, 3)


def test_dalle_schedule_from_the_paper():
    # layers 1..8: column attention at 2 and 6, convolutional at 8, row elsewhere
    expected = ["row", "col", "row", "row", "row", "col", "row", "conv"]
    assert attention_schedule("dalle", 8) == expected
    kinds = attention_schedule("dalle", 64)  # the 12B model
    assert [i + 1 for i, k in enumerate(kinds) if k == "col"] == list(range(2, 63, 4))
    assert kinds[-1] == "conv" and kinds.count("conv") == 1 and kinds.count("row") == 47
    assert attention_schedule("dalle", 1) == ["conv"]
    assert attention_schedule("dalle", 2) == ["row", "conv"]
    assert attention_schedule("col", 3) == ["col"] * 3
    with pytest.raises(ValueError, match="attn_pattern"):
        attention_schedule("axial", 4)


# ---- dense kernels ----------------------------------------------------------------------------


def reference_attention(q, k, v, mask):
    """Explicit masked softmax in fp32: the definition every kernel must match."""
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
    q.requires_grad_(True)
    (attend(q, k, v, mask, impl=impl) * v).sum().backward()
    grad = q.grad.clone()
    q.grad = None
    (reference_attention(q, k, v, mask) * v).sum().backward()
    torch.testing.assert_close(grad, q.grad, atol=1e-5, rtol=0)


# ---- sparse computation = dense reference -----------------------------------------------------

# (text_len, grid, conv_kernel, S): S input positions, a prefix when S < L; kernels wider than
# half the grid make the conv window span more rows than it has columns
SPARSE_CASES = [(6, 4, 3, 22), (3, 5, 5, 28), (2, 6, 3, 20), (4, 7, 11, 53), (1, 3, 1, 10)]


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
@pytest.mark.parametrize("text_len,grid,kernel,S", SPARSE_CASES)
def test_sparse_attend_equals_dense_forward_and_backward(kind, text_len, grid, kernel, S):
    """fp32, tolerance 1e-5 absolute on outputs and on the gradients of q, k and v."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, S, 8, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 3, S, 8, generator=g)  # a random cotangent
    mask = build_attention_mask(kind, text_len, grid, kernel)[:S, :S]
    ref = reference_attention(q, k, v, mask)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for text_impl in ("matmul", "sdpa"):
        out = sparse_attend(q, k, v, kind, text_len, grid, kernel, text_impl=text_impl)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_sparse_attend_text_only_and_bad_lengths():
    q = torch.randn(1, 2, 4, 8)
    ref = reference_attention(q, q, q, build_attention_mask("row", 3, 4)[:4, :4])
    torch.testing.assert_close(sparse_attend(q, q, q, "row", 3, 4), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        sparse_attend(q[:, :, :3], q[:, :, :3], q[:, :, :3], "row", 3, 4)
    with pytest.raises(ValueError, match="kind"):
        sparse_attend(q, q, q, "full", 3, 4)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
def test_no_L_by_L_tensor_at_the_12b_sequence_length(kind):
    text_len, grid = 256, 32  # the 12B preset: L = 256 + 1024 positions
    L = text_len + grid * grid
    q, k, v = (torch.randn(1, 1, L, 4, requires_grad=True) for _ in range(3))
    with LargestTensor() as sparse:
        sparse_attend(q, k, v, kind, text_len, grid, 11).sum().backward()
    assert sparse.most < L * L // 2, (sparse.most, L * L)
    with LargestTensor() as dense:  # the check can fail: the dense reference holds (L, L)
        mask = build_attention_mask(kind, text_len, grid, 11)
        attend(q, k, v, mask, impl="matmul").sum().backward()
    assert dense.most >= L * L


@pytest.mark.parametrize("impl", ["sdpa", "matmul", "sparse"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_module_matches_reference(impl, kind):
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, 8, depth=2, layout=SeqLayout(kind, 3, 4, 3), impl=impl)
    mask = build_attention_mask(kind, 3, 4, 3)
    x = torch.randn(2, mask.shape[0], 16)
    q, k, v = attn.qkv(x).view(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
    y = reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, -1, 16)
    torch.testing.assert_close(attn(x), attn.proj(y), atol=1e-5, rtol=0)
    assert attn.sparse == (impl == "sparse" and kind != "full")


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
def test_sparse_layer_keeps_only_its_projections_for_backward(kind):
    """A sparse layer recomputes its blockwise scores, probabilities and key windows in backward:
    what autograd keeps is the layer input (for the QKV projection), the q/k/v projection and
    the attention output (for the output projection), each (B, S, width); never the per-query
    windows (B, H, S, text + window), which are wider here (H * (4 + 32) = 72 > 3 * H * D = 24).
    Gradients still equal the dense reference's (test_sparse_model_equals_dense_mask_model)."""
    torch.manual_seed(0)
    B, C, H, D, text_len, grid = 2, 8, 2, 4, 3, 8
    attn = SelfAttention(C, H, D, depth=2, layout=SeqLayout(kind, text_len, grid, 5), impl="sparse")
    S = text_len + grid * grid
    x = torch.randn(B, S, C, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in attn.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = attn(x)
    y.sum().backward()
    assert sum(saved.values()) <= B * S * (C + 3 * H * D + H * D), saved
    assert max(saved.values()) <= B * S * 3 * H * D
    assert x.grad is not None and all(p.grad is not None for p in attn.parameters())


# ---- flex_attention (CUDA) and the short-sequence dense dispatch ------------------------------


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("text_len,grid,kernel", [(6, 4, 3), (3, 5, 5), (4, 7, 11), (1, 3, 1)])
def test_flex_mask_mod_is_the_paper_mask(kind, text_len, grid, kernel):
    """The BlockMask flex_attention uses on CUDA comes from this mask_mod: evaluated pointwise
    over every (query, key) pair it is exactly the dense mask (itself checked against the
    paper's hand-written 4x4 masks above)."""
    from torch.nn.attention.flex_attention import create_mask

    from trainer.models.attention import flex_mask_mod

    want = build_attention_mask(kind, text_len, grid, kernel)
    L = want.shape[0]
    got = create_mask(flex_mask_mod(kind, text_len, grid, kernel), 1, 1, L, L, device="cpu")
    assert torch.equal(got[0, 0], want)


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
def test_flex_attention_forward_equals_the_blockwise_path(kind):
    """flex_attention has a CPU forward (eager) in torch 2.14, no CPU backward: the forward
    with the BlockMask equals `sparse_attend` (the backward runs only on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    from trainer.models.attention import flex_block_mask

    text_len, grid, kernel = 6, 8, 5
    S = text_len + grid * grid
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, S, 16, generator=g) for _ in range(3))
    block_mask = flex_block_mask(kind, text_len, grid, kernel, S, "cpu")
    out = flex_attention(q, k, v, block_mask=block_mask)
    ref = sparse_attend(q, k, v, kind, text_len, grid, kernel)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _module_pair(kind: str, text_len: int = 4, grid: int = 6, kernel: int = 3):
    torch.manual_seed(0)
    layout = SeqLayout(kind, text_len, grid, kernel)
    auto = SelfAttention(16, 2, 8, depth=2, layout=layout, impl="auto")
    blockwise = SelfAttention(16, 2, 8, depth=2, layout=layout, impl="sparse")
    blockwise.load_state_dict(auto.state_dict())
    return auto, blockwise, text_len + grid * grid


@pytest.mark.parametrize("kind", ["row", "col", "conv"])
def test_short_sequences_take_the_dense_mask_and_equal_the_blockwise_path(kind, monkeypatch):
    """impl auto at S <= DENSE_MAX_POSITIONS: one dense masked attention (no blockwise call),
    equal to the blockwise path in forward and in every gradient (fp32, 1e-5)."""
    import trainer.models.attention as A

    auto, blockwise, S = _module_pair(kind)
    calls = []
    monkeypatch.setattr(A, "sparse_attend", lambda *a, **k: calls.append(1) or sparse_attend(*a, **k))
    x = torch.randn(2, S, 16, requires_grad=True)
    w = torch.randn(2, S, 16)
    outs, grads = [], []
    for m in (auto, blockwise):
        y = m(x)
        grads.append(torch.autograd.grad((y * w).sum(), (x, *m.parameters())))
        outs.append(y)
    assert len(calls) == 2  # the blockwise module's forward + its recompute; none from auto
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_long_sequences_stay_blockwise(monkeypatch):
    import trainer.models.attention as A

    auto, blockwise, S = _module_pair("conv")
    monkeypatch.setattr(A, "DENSE_MAX_POSITIONS", S - 1)
    calls = []
    monkeypatch.setattr(A, "sparse_attend", lambda *a, **k: calls.append(1) or sparse_attend(*a, **k))
    x = torch.randn(2, S, 16)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), blockwise(x), atol=0, rtol=0)
    assert len(calls) == 2


def test_a_checkpointed_block_does_not_checkpoint_its_attention_again(monkeypatch):
    """With the engine's activation checkpointing, each sparse layer's attention runs twice per
    step (forward, then the block's recompute); before, the layer's own checkpoint inside the
    block's ran it a third time."""
    import trainer.models.attention as A
    from trainer.engine import apply_activation_checkpointing
    from trainer.models.dalle import DalleTransformer, dalle_preset

    monkeypatch.setattr(A, "DENSE_MAX_POSITIONS", 0)  # the blockwise path, as at 1280 positions
    calls = []
    monkeypatch.setattr(A, "sparse_attend", lambda *a, **k: calls.append(1) or sparse_attend(*a, **k))
    torch.manual_seed(0)
    model = DalleTransformer(dalle_preset("tiny", attn_pattern="row", depth=2))
    apply_activation_checkpointing(model)
    c = model.cfg
    text = torch.randint(0, c.text_vocab, (2, c.text_len))
    image = torch.randint(0, c.image_vocab, (2, c.image_grid**2))
    text_logits, image_logits = model(text, image)
    (text_logits.float().sum() + image_logits.float().sum()).backward()
    assert len(calls) == 2 * c.depth
    assert all(p.grad is not None for p in model.blocks.parameters())
