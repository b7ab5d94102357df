"""`t2i eval`: the digits judge, the diversity figure, prompt parsing and eval.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline.config import load_config
from data_pipeline.digits import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    DigitsConfig,
    build_digits,
    caption_for,
)
from tests.trainer.sample_fixtures import make_dvae
from trainer.digits_classifier import (
    ClassifierSection,
    load_digit_split,
    load_or_train,
    predict,
    training_key,
)
from trainer.evaluate import EvalConfig, compute_diversity, format_table, prompt_digit, run_eval


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=str(out), photos=0, mismatch_fraction=0.1), log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("judge"))


def test_classifier_learns_real_digits_and_is_reused(digits, judge_cache):
    cfg = ClassifierSection()
    model, info = load_or_train(digits, judge_cache, cfg, log=lambda *_: None)
    assert not info["reused"] and info["train_samples"] == 1617 and info["val_samples"] == 180
    val_x, val_y = load_digit_split(digits, "val")
    acc = float((predict(model, val_x, cfg.image_size) == val_y).mean())
    assert acc >= 0.9 and acc == pytest.approx(info["val_accuracy"], abs=1e-6)
    again, info2 = load_or_train(digits, judge_cache, cfg, log=lambda *_: None)
    assert info2["reused"] and np.array_equal(predict(again, val_x, 16), predict(model, val_x, 16))
    # different settings are a different judge (the cache is not silently reused)
    assert training_key(digits, ClassifierSection(epochs=3), None) != info["key"]


def test_prompt_digit_reads_templates_words_and_numerals():
    for d in range(10):
        assert prompt_digit(caption_for(d, TRAIN_TEMPLATES[0])) == (d, "train")
        assert prompt_digit(caption_for(d, HELDOUT_TEMPLATES[1]).upper()) == (d, "heldout")
    assert prompt_digit("draw me a seven please") == (7, "other")
    assert prompt_digit("a 4 in red ink") == (4, "other")
    assert prompt_digit("a seven and a 3") == (None, "other")  # two digits: no single label
    assert prompt_digit("a cat") == (None, "other")
    assert prompt_digit("the year 2024") == (None, "other")  # no lone digit


def test_diversity_is_zero_for_copies_and_positive_for_real_digits(digits):
    val_x, val_y = load_digit_split(digits, "val")
    sevens = val_x[val_y == 7]
    assert compute_diversity(np.repeat(sevens[:1], 5, axis=0)) == 0.0
    real = compute_diversity(sevens)
    assert real > 0.05
    assert compute_diversity(sevens[:1]) is None
    # a brute-force check of the vectorised pairwise mean
    g = sevens.astype(np.float64).mean(-1).reshape(len(sevens), -1) / 255
    pairs = [np.sqrt(((g[i] - g[j]) ** 2).mean()) for i in range(len(g)) for j in range(i)]
    assert real == pytest.approx(np.mean(pairs), rel=1e-9)


def write_sample_run(root, digits) -> dict[str, list]:
    """A `t2i sample`-shaped dir whose "generated" images are real val digits: two per prompt,
    except the prompts for 5, which get one image copied (a collapsed model)."""
    val_x, val_y = load_digit_split(digits, "val")
    (root / "images").mkdir(parents=True)
    rows = []
    for d in range(10):
        pool = val_x[val_y == d]
        for t, template in enumerate((TRAIN_TEMPLATES[0], HELDOUT_TEMPLATES[0])):
            prompt = caption_for(d, template)
            pick = [pool[0], pool[0]] if d == 5 else [pool[2 * t], pool[2 * t + 1]]
            for rank, img in enumerate(pick, start=1):
                path = f"images/{len(rows):04d}.png"
                Image.fromarray(img).save(root / path)
                rows.append(
                    {
                        "recipe": "ar",
                        "prompt": prompt,
                        "path": path,
                        "rank": rank,
                        "clip_score": 0.25 + 0.01 * d,
                        "seed": len(rows),
                    }
                )
    rows.append(
        {
            "recipe": "ar",
            "prompt": "a cat",
            "path": rows[0]["path"],
            "rank": 1,
            "clip_score": None,
            "seed": 0,
        }
    )
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_eval_on_a_synthetic_sample_run(digits, judge_cache, tmp_path, capsys):
    rows = write_sample_run(tmp_path / "samples", digits)
    cfg = load_config(
        EvalConfig,
        None,
        [
            f"samples={tmp_path / 'samples'}",
            f"digits={digits}",
            f"classifier.cache={judge_cache}",
            f"image_tokenizer={make_dvae(tmp_path / 'dvae')}",
            "psnr_images=16",
        ],
    )
    doc = run_eval(cfg, log=lambda *_: None)
    assert doc == json.loads((tmp_path / "samples" / "eval" / "eval.json").read_text())
    assert doc["format"] == "ray-t2i/eval" and doc["version"] == 1
    assert doc["images"] == len(rows) and doc["prompts"] == 21
    assert doc["unlabelled_prompts"] == ["a cat"]
    acc = doc["accuracy"]
    assert acc["labelled"] == 40 and acc["overall"] >= 0.85  # real digits, a 0.9+ judge
    assert set(acc["per_digit"]) == {str(d) for d in range(10)}
    assert acc["by_template"]["heldout"] is not None and acc["by_template"]["other"] is None
    div = doc["diversity"]
    assert div["per_digit"]["5"]["generated"] == 0.0  # the collapsed digit is caught
    assert div["per_digit"]["5"]["real"] > 0 and div["per_digit"]["5"]["ratio"] == 0.0
    others = [div["per_digit"][str(d)]["ratio"] for d in range(10) if d != 5]
    assert all(r > 0.3 for r in others)  # real pairs vary like real digits do
    assert doc["clip_score"]["images"] == 40
    assert doc["clip_score"]["mean"] == pytest.approx(np.mean([0.25 + 0.01 * d for d in range(10)]))
    tok = doc["tokenizer"]
    assert tok["kind"] == "dvae" and tok["images"] == 16 and np.isfinite(tok["psnr_db"])
    assert doc["classifier"]["val_accuracy"] >= 0.9
    table = format_table(doc)
    assert "held-out" in table and table.count("\n") >= 13


def test_eval_scores_a_latent_diffusion_sample_run(digits, judge_cache, tmp_path, one_thread):
    """`t2i eval` on `t2i sample recipe=ldm` output (a tiny random setup: the accuracy itself is
    chance, the point is that the whole path runs and records the recipe)."""
    from tests.trainer.sample_fixtures import make_ldm_inputs
    from trainer.sampling.config import SampleConfig
    from trainer.sampling.run import run_sample

    inputs = make_ldm_inputs(tmp_path / "inputs")
    prompts = [caption_for(d, TRAIN_TEMPLATES[0]) for d in range(10)]
    prompts += [caption_for(d, HELDOUT_TEMPLATES[0]) for d in range(10)]
    sample_cfg = load_config(SampleConfig, None, [
        *[f"{k}={v}" for k, v in inputs.items()], f"output={tmp_path / 'samples'}",
        f"sample.prompts={json.dumps(prompts)}", "sample.candidates=2", "sample.keep=2",
        "sample.steps=2", "precision=fp32", "num_cpus=1", "clip.enabled=false",
    ])  # fmt: skip
    run_sample(sample_cfg, log=lambda *_: None)
    cfg = load_config(EvalConfig, None, [
        f"samples={tmp_path / 'samples'}", f"digits={digits}", f"classifier.cache={judge_cache}",
        f"image_tokenizer={inputs['image_tokenizer']}", "psnr_images=16",
    ])  # fmt: skip
    doc = run_eval(cfg, log=lambda *_: None)
    assert doc["recipes"] == ["ldm"] and doc["images"] == 40 and doc["prompts"] == 20
    acc = doc["accuracy"]
    assert acc["labelled"] == 40 and 0.0 <= acc["overall"] <= 1.0
    assert acc["by_template"]["train"] is not None and acc["by_template"]["heldout"] is not None
    assert doc["tokenizer"]["kind"] == "klae" and doc["clip_score"]["mean"] is None
