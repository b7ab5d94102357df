"""Bounded BPE training (#27): the caption sample holds at most `k` captions whatever the data
size, is order-independent (Ray delivers rows in any order) and merges across shards; and the
random-weights refusal of tokenize's text encoder and sampling's reranker."""

import random
import tracemalloc

import pytest

from data_pipeline.config import ConfigError, load_config
from data_pipeline.text_tokens import CaptionSample
from data_pipeline.tokenize.config import TokenizeConfig, check_config


def test_caption_sample_is_bounded_uniform_and_order_free():
    k, n = 200, 20_000
    caption = "x" * 1000  # 20 MB of captions streamed through
    tracemalloc.start()
    sample = CaptionSample(k)
    for i in range(n):
        sample.add((i // 1000, i % 1000), caption + str(i))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(sample) == k and sample.seen == n
    assert peak < 4 * k * 1100 + (1 << 20), peak  # O(k) captions, not O(n)

    # The same set in another order, or split into per-shard samples merged: the same sample.
    pairs = [((i // 1000, i % 1000), f"c{i}") for i in range(n)]
    a = CaptionSample(k)
    for ident, c in pairs:
        a.add(ident, c)
    random.Random(0).shuffle(pairs)
    b = CaptionSample(k)
    for ident, c in pairs:
        b.add(ident, c)
    merged = CaptionSample(k)
    for shard in range(n // 1000):
        part = CaptionSample(k)
        for ident, c in pairs:
            if ident[0] == shard:
                part.add(ident, c)
        for h, ident, c in part.items():
            merged.add(ident, c, rank=h)
    assert a.captions() == b.captions() == merged.captions()
    # Uniform: every shard contributes about k / 20 captions.
    per_shard = [sum(1 for _, ident, _ in a.items() if ident[0] == s) for s in range(20)]
    assert max(per_shard) < 25 and min(per_shard) > 2, per_shard
    with pytest.raises(ValueError, match="train_captions"):
        CaptionSample(0)


def test_random_weights_refused_unless_allowed(tmp_path):
    base = ["input=x", "output=y", "recipe=ldm", "text_tokenizer.kind=open_clip",
            "image_tokenizer.path=z"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"text_encoder\.checkpoint is empty.*allow_random"):
        check_config(load_config(TokenizeConfig, None, base))
    check_config(load_config(TokenizeConfig, None, base + ["text_encoder.allow_random=true"]))
    check_config(load_config(TokenizeConfig, None, base + ["text_encoder.checkpoint=w.pt"]))
    with pytest.raises(ConfigError, match="train_captions"):
        check_config(
            load_config(
                TokenizeConfig,
                None,
                [*base[:2], "image_tokenizer.path=z", "text_tokenizer.train_captions=0"],
            )
        )

    from trainer.sampling.config import SampleConfig
    from trainer.sampling.config import check_config as check_sample

    s = ["model=m", "tokens=t", "image_tokenizer=i", "output=o", 'sample.prompts=["a"]']
    with pytest.raises(ValueError, match=r"clip\.checkpoint is empty.*clip\.allow_random=true"):
        check_sample(load_config(SampleConfig, None, s))
    check_sample(load_config(SampleConfig, None, s + ["clip.allow_random=true"]))
    check_sample(load_config(SampleConfig, None, s + ["clip.enabled=false"]))
