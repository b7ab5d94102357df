"""`t2i sample` building blocks: filtering, KV-cached sampling, seeds, reranking and outputs."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import fs
from data_pipeline.config import load_config
from tests.trainer.sample_fixtures import (
    DIGIT_PROMPTS,
    GRID,
    TEXT_LEN,
    make_dvae,
    make_sample_inputs,
    sample_config,
)
from trainer.models.dalle import DalleTransformer, dalle_preset
from trainer.sampling.ar import filter_logits, generate_ar, load_dalle, next_codes, sample_codes
from trainer.sampling.config import SampleConfig, check_config, read_prompts
from trainer.sampling.run import run_sample

NEG = float("-inf")


def support(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG)[:, 0].tolist()) for row in logits]


# ---- filtering (hand-built logits) ----------------------------------------------------------


def hand_logits() -> torch.Tensor:
    """Two rows over 6 codes; probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 in shuffled places."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    row0 = probs[[3, 0, 5, 1, 4, 2]]  # code 1 is the likeliest, then 3, 5, 0, 4, 2
    row1 = probs  # in order: code 0, 1, 2, ...
    return torch.stack([row0, row1]).log()


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = hand_logits()
    assert support(filter_logits(logits, top_k=2)) == [{1, 3}, {0, 1}]
    assert support(filter_logits(logits, top_k=1)) == [{1}, {0}]
    assert support(filter_logits(logits, top_k=0)) == [set(range(6))] * 2  # off
    assert support(filter_logits(logits, top_k=99)) == [set(range(6))] * 2
    ties = torch.zeros(1, 5)  # all equal: still exactly k codes
    assert len(support(filter_logits(ties, top_k=3))[0]) == 3


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.3, [{1}, {0}]),  # 0.4 already reaches 0.3
        (0.6, [{1, 3}, {0, 1}]),  # 0.4 < 0.6 <= 0.65
        (0.75, [{1, 3, 5}, {0, 1, 2}]),  # 0.65 < 0.75 <= 0.8
        (0.95, [{1, 3, 5, 0, 4}, {0, 1, 2, 3, 4}]),  # 0.9 < 0.95 <= 0.96
        (1.0, [set(range(6))] * 2),  # off
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert support(filter_logits(hand_logits(), top_p=top_p)) == expected


def test_top_k_then_top_p_renormalises():
    # top-2 leaves 0.4 and 0.25 -> 0.615 and 0.385: top_p 0.6 keeps one code, 0.7 both.
    assert support(filter_logits(hand_logits(), top_k=2, top_p=0.6)) == [{1}, {0}]
    assert support(filter_logits(hand_logits(), top_k=2, top_p=0.7)) == [{1, 3}, {0, 1}]


def test_inverse_cdf_draws_follow_the_filtered_distribution():
    """Evenly spaced uniforms must land on each code in proportion to its probability."""
    logits = hand_logits()[:1].expand(1000, 6)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    codes = next_codes(logits, u, temperature=1.0, top_k=0, top_p=0.75)
    counts = torch.bincount(codes, minlength=6).float() / 1000
    kept = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.0, 0.15]) / 0.8  # codes 1, 3, 5 renormalised
    torch.testing.assert_close(counts, kept, atol=2e-3, rtol=0)
    assert torch.equal(next_codes(logits[:2], u[:2], 0.0, 0, 1.0), torch.tensor([1, 1]))  # greedy


# ---- KV-cached sampling ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DalleTransformer(dalle_preset("tiny", attn_pattern="dalle")).eval()


def prompts_tensor(model, b=3):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, model.cfg.text_vocab, (b, model.cfg.text_len), generator=g)
    text[1, 5:] = 0  # padding
    return text


def test_kv_cache_sampling_equals_no_cache_sampling_when_greedy(one_thread, tiny_model):
    text = prompts_tensor(tiny_model)
    fast = sample_codes(tiny_model, text, [1, 2, 3], temperature=0.0)
    slow = sample_codes(tiny_model, text, [1, 2, 3], temperature=0.0, use_cache=False)
    assert fast.shape == (3, tiny_model.cfg.image_len)
    assert torch.equal(fast, slow)


def test_seeds_fix_each_row_independently_of_its_batch(one_thread, tiny_model):
    text = prompts_tensor(tiny_model)
    kw = dict(temperature=1.0, top_k=16, top_p=0.95)
    a = sample_codes(tiny_model, text, [10, 11, 12], **kw)
    assert torch.equal(a, sample_codes(tiny_model, text, [10, 11, 12], **kw))
    alone = sample_codes(tiny_model, text[1:2], [11], **kw)  # same seed, other batch-mates
    assert torch.equal(alone[0], a[1])
    other = sample_codes(tiny_model, text, [20, 21, 22], **kw)
    assert not torch.equal(a, other)
    assert ((a < 0) | (a >= tiny_model.cfg.image_vocab)).sum() == 0


# ---- the AR recipe on a tiny tokenizer setup -------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_sample_inputs(tmp_path_factory.mktemp("sample-inputs"))


def test_fixed_seed_reproduces_codes_and_images(one_thread, inputs, tmp_path):
    cfg = sample_config(inputs, tmp_path, "sample.top_k=32", "sample.batch_size=4")
    prompts = read_prompts(cfg)
    a = generate_ar(cfg, prompts, "cpu", log=lambda *_: None)
    b = generate_ar(cfg, prompts, "cpu", log=lambda *_: None)
    assert a.images.shape == (3, 3, GRID * 4, GRID * 4, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.images, b.images)
    assert np.array_equal(a.seeds, b.seeds) and len(np.unique(a.seeds)) == a.seeds.size
    reseeded = replace(cfg, sample=replace(cfg.sample, seed=1))
    c = generate_ar(reseeded, prompts, "cpu", log=lambda *_: None)
    assert not np.array_equal(a.codes, c.codes) and not np.array_equal(a.images, c.images)


def test_a_truncated_prompt_is_warned_about(one_thread, inputs, tmp_path):
    long = "someone wrote the number seven and then the number eight"
    prompts = json.dumps(["the number 7", long])
    cfg = sample_config(inputs, tmp_path, f"sample.prompts={prompts}", "sample.candidates=1")
    lines: list[str] = []
    generate_ar(cfg, read_prompts(cfg), "cpu", log=lines.append)
    (warned,) = [line for line in lines if line.startswith("warning: prompt")]
    assert repr(long) in warned and f"text_len is {TEXT_LEN}" in warned


def test_run_sample_writes_reranked_images_jsonl_and_grid(one_thread, inputs, tmp_path):
    out = tmp_path / "out"
    cfg = sample_config(inputs, out)
    summary = run_sample(cfg, log=lambda *_: None)
    assert summary["images"] == 6 and summary["candidates"] == 9
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["rank"]) for r in rows] == [
        (p, k) for p in range(3) for k in (1, 2)
    ]
    for r in rows:
        assert set(r) == {
            "recipe",
            "prompt",
            "prompt_index",
            "path",
            "rank",
            "clip_score",
            "seed",
            "candidate",
        }
        assert r["recipe"] == "ar" and r["prompt"] == DIGIT_PROMPTS[r["prompt_index"]]
        img = np.asarray(Image.open(out / r["path"]))
        assert img.shape == (GRID * 4, GRID * 4, 3)
        assert math.isfinite(r["clip_score"]) and -1 <= r["clip_score"] <= 1
    for p in range(3):  # best first, two different candidates
        best, second = rows[2 * p], rows[2 * p + 1]
        assert best["clip_score"] >= second["clip_score"]
        assert best["candidate"] != second["candidate"]
    grid = Image.open(out / "grid.png")
    assert grid.height >= 3 * 96 and grid.width > 2 * 96  # tiny images upscaled, label column
    assert (out / "config.yaml").exists()
    # without CLIP: the first `keep` candidates in order, no score
    run_sample(sample_config(inputs, out / "plain", "clip.enabled=false"), log=lambda *_: None)
    plain = [json.loads(x) for x in (out / "plain" / "samples.jsonl").read_text().splitlines()]
    assert [r["candidate"] for r in plain[:2]] == [0, 1]
    assert all(r["clip_score"] is None for r in plain)


def test_config_and_prompt_errors_name_the_key(inputs, tmp_path):
    with pytest.raises(ValueError, match="sample.keep"):
        check_config(sample_config(inputs, tmp_path, "sample.keep=5"))
    with pytest.raises(ValueError, match="sample.top_p"):
        check_config(sample_config(inputs, tmp_path, "sample.top_p=0"))
    with pytest.raises(ValueError, match="no prompts"):
        check_config(sample_config(inputs, tmp_path, "sample.prompts=[]"))
    (tmp_path / "p.txt").write_text("# digits\nthe number 7\n\n  a drawing of the numeral 3 \n")
    cfg = sample_config(
        inputs, tmp_path, f"sample.prompts_file={tmp_path}/p.txt"
    )  # replaces the list
    assert read_prompts(cfg) == ["the number 7", "a drawing of the numeral 3"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompts(sample_config(inputs, tmp_path, f"sample.prompts_file={tmp_path}/empty.txt"))


def test_model_from_a_run_dir_takes_the_newest_complete_checkpoint(inputs, tmp_path):
    from trainer import checkpoint as ck
    from trainer.models.image_tokenizer import CONFIG, WEIGHTS

    run = tmp_path / "run"
    for step, complete in ((2, True), (4, False)):  # step 4 crashed before its manifest
        d = run / "checkpoints" / ck.step_dir_name(step)
        d.mkdir(parents=True)
        for name in (WEIGHTS, CONFIG):
            shutil.copy(f"{inputs['model']}/{name}", d / name)
        if complete:
            files = {}
            for name in (WEIGHTS, CONFIG):
                size, digest = fs.file_digest(str(d / name))
                files[name] = {"bytes": size, "sha256": digest}
            ck.write_manifest(fs.resolve(str(d)), step, files)
    model, train_cfg = load_dalle(str(run), load_config(SampleConfig, None, require=False).storage)
    assert train_cfg.objective == "dalle" and not model.training
    with pytest.raises(FileNotFoundError, match="no DALL-E model here"):
        load_dalle(str(tmp_path / "empty"), train_cfg.storage)
    with pytest.raises(ValueError, match="objective is 'dvae'"):
        load_dalle(inputs["image_tokenizer"], train_cfg.storage)


def test_an_image_tokenizer_other_than_the_datasets_is_refused(inputs, tmp_path):
    other = make_dvae(tmp_path / "other-dvae", seed=1)  # same shape, other weights
    cfg = sample_config(inputs, tmp_path, f"image_tokenizer={other}")
    with pytest.raises(ValueError, match="differ from the tokenizer"):
        generate_ar(cfg, read_prompts(cfg), "cpu", log=lambda *_: None)
