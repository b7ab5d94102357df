"""The DALL-E transformer: config checks, token handling, the off-by-one, loss weighting, the KV
cache for every mask pattern, presets at billion scale (meta device), bf16, weight names and init."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.config import DalleTrainSection
from trainer.models.dalle import (
    DalleConfig,
    DalleTransformer,
    compute_dalle_loss,
    corrupt_text,
    dalle_preset,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = ["full", "dalle", "row", "col", "conv"]


def tiny(**overrides) -> DalleConfig:
    return dalle_preset("tiny", **overrides)


def make_model(seed: int = 0, **overrides) -> DalleTransformer:
    torch.manual_seed(seed)
    return DalleTransformer(tiny(**overrides)).eval()


def batch(cfg: DalleConfig, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab, (b, cfg.text_len), generator=g)
    image = torch.randint(0, cfg.image_vocab, (b, cfg.image_len), generator=g)
    return text, image


# ---- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("dim", 0),
        ("text_len", 300),
        ("conv_kernel", 4),
        ("attn_pattern", "axial"),
        ("text_pad_id", 64),
        ("dropout", 1.0),
        ("heads", 2.5),
        ("attn_impl", "flash"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"DalleConfig.{field}"):
        tiny(**{field: value})


def test_config_defaults_are_tiny_and_derived_sizes():
    assert DalleConfig() == dalle_preset("tiny")
    cfg = dalle_preset("12b")
    assert cfg.image_len == 1024 and cfg.seq_len == 256 + 1024
    assert cfg.text_vocab_internal == 16384 + 256 + 1
    assert dalle_preset("digits", depth=2).depth == 2
    with pytest.raises(ValueError, match="unknown DALL-E preset"):
        dalle_preset("huge")


# ---- text tokens ----------------------------------------------------------------------------


def test_internal_text_pads_per_position_and_marks_empty_captions():
    model = make_model()
    V, T = model.cfg.text_vocab, model.cfg.text_len
    text = torch.tensor([[5, 9, 0, 0, 0, 0, 0, 0], [0] * T, [0, 3] + [7] * (T - 2)])
    ids = model.internal_text(text)
    assert ids[0].tolist() == [5, 9] + [V + i for i in range(2, T)]
    assert ids[1].tolist() == [V + T] + [V + i for i in range(1, T)]  # "no text" at position 0
    assert ids[2, 0] == V and ids[2, 1:].tolist() == text[2, 1:].tolist()
    assert int(ids.max()) < model.cfg.text_vocab_internal


def test_input_errors():
    model = make_model()
    text, image = batch(model.cfg)
    with pytest.raises(ValueError, match="text must be"):
        model(text[:, :3], image)
    with pytest.raises(ValueError, match="image must be"):
        model(text, torch.zeros(2, model.cfg.image_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="text ids"):
        model(text + model.cfg.text_vocab, image)
    with pytest.raises(ValueError, match="image codes"):
        model(text, image + model.cfg.image_vocab)


# ---- the off-by-one ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["full", "dalle"])
def test_prediction_at_i_never_reads_token_i_or_later(pattern):
    model = make_model(attn_pattern=pattern)
    cfg = model.cfg
    text, image = batch(cfg)
    with torch.no_grad():
        t0, i0 = model(text, image)
        assert t0.shape == (2, cfg.text_len, cfg.text_vocab_internal)
        assert i0.shape == (2, cfg.image_len, cfg.image_vocab)
        for i in (0, 3, cfg.text_len - 1):  # perturb text token i
            t2 = text.clone()
            t2[:, i] = t2[:, i] % (cfg.text_vocab - 1) + 1  # another non-pad id
            tl, il = model(t2, image)
            assert torch.equal(tl[:, : i + 1], t0[:, : i + 1])  # predictions of text 0..i
            if i + 1 < cfg.text_len:
                assert (tl[:, i + 1 :] - t0[:, i + 1 :]).abs().amax(-1).min() > 0
            assert (il - i0).abs().amax(-1).min() > 0  # every image position sees all text
        for j in (0, 5, cfg.image_len - 2):  # perturb image token j
            im2 = image.clone()
            im2[:, j] = (im2[:, j] + 1) % cfg.image_vocab
            tl, il = model(text, im2)
            assert torch.equal(tl, t0)
            assert torch.equal(il[:, : j + 1], i0[:, : j + 1])  # predictions of image 0..j
            changed = (il[:, j + 1 :] - i0[:, j + 1 :]).abs().amax(-1) > 0  # (B, N-j-1)
            assert changed[:, 0].all()  # the very next prediction reads token j
            if pattern == "full":
                assert changed.all()
        im2 = image.clone()
        im2[:, -1] = (im2[:, -1] + 1) % cfg.image_vocab  # the last code is a target only
        assert torch.equal(model(text, im2)[1], i0)


def test_image_prefix_gives_prefix_logits():
    model = make_model()
    text, image = batch(model.cfg)
    with torch.no_grad():
        full = model(text, image)[1]
        part = model(text, image[:, :7])[1]
    torch.testing.assert_close(part, full[:, :7], atol=1e-5, rtol=0)


# ---- loss -----------------------------------------------------------------------------------


def test_loss_weighting_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    tl, il = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 7, generator=g)
    tt, it = torch.randint(0, 5, (2, 3), generator=g), torch.randint(0, 7, (2, 4), generator=g)

    def nll(logits, targets):  # mean of -log p(target), written out
        total, count = 0.0, 0
        for b in range(logits.shape[0]):
            for s in range(logits.shape[1]):
                row = logits[b, s]
                total += -(row[targets[b, s]] - torch.logsumexp(row, 0)).item()
                count += 1
        return total / count

    loss, metrics = compute_dalle_loss(tl, il, tt, it, text_weight=0.25, image_weight=2.0)
    assert math.isclose(metrics["loss_text"].item(), nll(tl, tt), rel_tol=1e-5)
    assert math.isclose(metrics["loss_image"].item(), nll(il, it), rel_tol=1e-5)
    assert math.isclose(loss.item(), 0.25 * nll(tl, tt) + 2.0 * nll(il, it), rel_tol=1e-5)
    with pytest.raises(ValueError, match="mismatch"):
        compute_dalle_loss(tl, il, tt[:, :2], it)


# ---- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "matmul", "sdpa"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_kv_cache_teacher_forcing_equals_forward(pattern, impl):
    """Cached logits = uncached logits; "dalle" has row, col and conv layers (tiny: 4 layers)."""
    model = make_model(attn_pattern=pattern, attn_impl=impl)
    text, image = batch(model.cfg, b=3)
    text[1, 4:] = 0  # padding
    text[2] = 0  # empty caption
    with torch.no_grad():
        expected = model(text, image)[1]  # (B, N, V)
    cache, logits = model.prefill(text)
    got = [logits]
    for j in range(model.cfg.image_len - 1):
        got.append(model.decode_step(image[:, j], cache))
    torch.testing.assert_close(torch.stack(got, 1), expected, atol=1e-4, rtol=0)
    assert cache.pos == cache.length == model.cfg.seq_len
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_step(image[:, -1], cache)


def test_greedy_decoding_with_cache_equals_repeated_forward():
    model = make_model(attn_pattern="dalle")
    text, _ = batch(model.cfg)
    n = model.cfg.image_len
    cache, logits = model.prefill(text)
    cached = [logits.argmax(-1)]
    for _ in range(n - 1):
        cached.append(model.decode_step(cached[-1], cache).argmax(-1))
    slow = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for j in range(n):
            dummy = torch.zeros(2, 1, dtype=torch.long)  # a target slot, never read
            nxt = model(text, torch.cat([slow, dummy], 1))[1][:, j].argmax(-1)
            slow = torch.cat([slow, nxt[:, None]], 1)
    assert torch.equal(torch.stack(cached, 1), slow)


# ---- scale, precision, names ---------------------------------------------------------------


def test_12b_and_1b3_presets_on_meta():
    with torch.device("meta"):
        big = DalleTransformer(dalle_preset("12b"))
        mid = DalleTransformer(dalle_preset("1b3"))
    n = big.num_params()
    assert 11.5e9 < n < 13e9, n
    assert mid.num_params() >= 1.0e9
    assert big.layer_kinds[:3] == ["row", "col", "row"] and big.layer_kinds[-1] == "conv"
    assert not list(big.buffers()), "no mask buffers: sparse layers hold no (L, L) mask"
    # flops/token is dominated by 6 x the non-embedding parameters
    ratio = big.flops_per_token() / (6 * big.num_params(exclude_embeddings=True))
    assert 1.0 < ratio < 1.2, ratio


def test_meta_build_then_materialise():
    with torch.device("meta"):
        model = DalleTransformer(tiny())
    model.to_empty(device="cpu")
    ref = make_model()
    model.load_state_dict(ref.state_dict(), strict=True)
    text, image = batch(ref.cfg)
    with torch.no_grad():
        assert torch.equal(model.eval()(text, image)[1], ref(text, image)[1])


@pytest.mark.parametrize("pattern", ["dalle", "row", "col", "conv"])
def test_sparse_model_equals_dense_mask_model(pattern):
    """The blockwise path (auto) vs dense (L, L) masks (matmul): fp32 logits and every parameter
    gradient within 1e-5 absolute."""
    cfg = tiny(attn_pattern=pattern, image_grid=5, text_len=6, conv_kernel=3)
    torch.manual_seed(0)
    sparse = DalleTransformer(cfg)
    dense = DalleTransformer(replace(cfg, attn_impl="matmul"))
    dense.load_state_dict(sparse.state_dict(), strict=True)
    assert all(b.attn.sparse for b in sparse.blocks)
    assert not any(b.attn.sparse for b in dense.blocks)
    text, image = batch(cfg)
    outs = []
    for m in (sparse, dense):
        tl, il = m(text, image)
        compute_dalle_loss(tl, il, m.internal_text(text), image)[0].backward()
        outs.append((tl, il, [p.grad for p in m.parameters()]))
    (tl_s, il_s, g_s), (tl_d, il_d, g_d) = outs
    torch.testing.assert_close(tl_s, tl_d, atol=1e-5, rtol=0)
    torch.testing.assert_close(il_s, il_d, atol=1e-5, rtol=0)
    for a, b in zip(g_s, g_d, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sparse_flops_count_less_attention_than_dense():
    cfg = dalle_preset("12b")
    with torch.device("meta"):
        sparse = DalleTransformer(cfg).flops_per_token()
        dense = DalleTransformer(replace(cfg, attn_impl="matmul")).flops_per_token()
    attn_dense = 12 * cfg.depth * cfg.heads * cfg.head_dim * cfg.seq_len
    assert 0.5 * attn_dense < dense - sparse < attn_dense


def test_bf16_module_and_autocast():
    model = make_model().train()
    text, image = batch(model.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tl, il = model(text, image)
        loss, _ = compute_dalle_loss(tl, il, model.internal_text(text), image)
    assert il.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss)
    model = model.to(torch.bfloat16)
    tl, il = model(text, image)
    loss, _ = compute_dalle_loss(tl, il, model.internal_text(text), image)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16
    cache, logits = model.prefill(text)  # the cache follows the module dtype
    assert cache.keys[0].dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_state_dict_names_and_strict_roundtrip():
    model = make_model()
    keys = set(model.state_dict())
    for name in [
        "text_emb.weight",
        "image_emb.weight",
        "text_pos.weight",
        "image_row_pos.weight",
        "image_col_pos.weight",
        "blocks.0.ln_1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.3.mlp.fc.weight",
        "blocks.3.mlp.proj.weight",
        "ln_f.weight",
        "text_head.weight",
        "image_head.weight",
    ]:
        assert name in keys, name
    assert not any("mask" in k for k in keys)  # masks are non-persistent buffers
    other = make_model(seed=5)
    other.load_state_dict(model.state_dict(), strict=True)
    text, image = batch(model.cfg)
    with torch.no_grad():
        assert torch.equal(other(text, image)[1], model(text, image)[1])


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = DalleTransformer(tiny(dim=256, depth=8, heads=4, head_dim=64))
    blk = model.blocks[0]
    assert abs(blk.attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.text_emb.weight.std().item() - 0.02) < 1e-3
    for w in (blk.attn.proj.weight, blk.mlp.proj.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert not blk.attn.qkv.bias.any() and not blk.mlp.fc.bias.any()
    assert torch.equal(blk.ln_1.weight, torch.ones(256))


def test_activation_checkpointing_from_outside_keeps_gradients():
    model = make_model().train()
    text, image = batch(model.cfg)

    def grads(m):
        m.zero_grad()
        tl, il = m(text, image)
        compute_dalle_loss(tl, il, m.internal_text(text), image)[0].backward()
        return [p.grad.clone() for p in m.parameters()]

    ref = grads(model)
    for block in model.blocks:  # what the engine does
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    for a, b in zip(ref, grads(model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_few_steps_learn_a_fixed_batch():
    model = make_model().train()
    text, image = batch(model.cfg, b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        tl, il = model(text, image)
        loss, _ = compute_dalle_loss(tl, il, model.internal_text(text), image)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # chance level at init: log(vocab) for both heads
    assert abs(losses[0] - F.cross_entropy(torch.zeros(1, 64), torch.zeros(1).long())) < 0.5


# ---- caption noise ------------------------------------------------------------------------------


def _captions(pad: int = 0) -> torch.Tensor:
    rows = [[5, 6, 7], [9], list(range(1, 9)), [], [3, 3]]
    return torch.tensor([r + [pad] * (8 - len(r)) for r in rows])


@pytest.mark.parametrize("pad", [0, 4])
def test_corrupt_text_insert_keeps_caption_order_and_padding(pad):
    text = _captions(pad)
    torch.manual_seed(0)
    grew = 0
    for _ in range(50):
        out = corrupt_text(text, pad_id=pad, vocab=64, insert_p=1.0, replace_p=0.0)
        assert out.shape == text.shape and out.dtype == text.dtype
        for before, after in zip(text.tolist(), out.tolist(), strict=True):
            own = [t for t in before if t != pad]
            n = sum(t != pad for t in after)
            assert after[n:] == [pad] * (8 - n)  # still right-padded, no pad inside
            it = iter(after[:n])
            assert all(t in it for t in own)  # the caption is a subsequence, in order
            assert all(0 <= t < 64 for t in after)
            if len(own) < 8:
                assert n > len(own)  # insert_p=1: every caption with room gets noise
            grew += n - len(own)
    assert grew > 50  # k ~ U{1..free}, not always 1


def test_corrupt_text_replace_and_identity():
    text = _captions()
    assert corrupt_text(text, pad_id=0, vocab=64, insert_p=0.0, replace_p=0.0) is text
    torch.manual_seed(1)
    out = corrupt_text(text, pad_id=0, vocab=64, insert_p=0.0, replace_p=1.0)
    assert torch.equal(out == 0, text == 0)  # pads stay, tokens never become pad
    assert (out != text)[text != 0].float().mean() > 0.9  # (a random id may equal the old one)
    torch.manual_seed(1)
    assert torch.equal(corrupt_text(text, pad_id=0, vocab=64, insert_p=0.0, replace_p=1.0), out)
    torch.manual_seed(2)
    half = corrupt_text(text, pad_id=0, vocab=64, insert_p=0.0, replace_p=0.5)
    assert 0 < int(((half != text) & (text != 0)).sum()) < int((text != 0).sum())


def test_caption_noise_probabilities_are_checked():
    with pytest.raises(ValueError, match="text_insert_p"):
        DalleTrainSection(text_insert_p=1.5)
    with pytest.raises(ValueError, match="text_replace_p"):
        DalleTrainSection(text_replace_p=-0.1)
