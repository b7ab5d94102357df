"""TextTokenizer: deterministic BPE training, fixed-length encoding, files and fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.digits import DIGIT_WORDS, TRAIN_TEMPLATES, caption_for
from data_pipeline.text_tokens import PAD_ID, TextTokenizer, load_text_tokenizer

CAPTIONS = [caption_for(d, t) for t in TRAIN_TEMPLATES for d in range(len(DIGIT_WORDS))] * 3

TRAIN_SNIPPET = """
import sys
from data_pipeline.text_tokens import TextTokenizer
caps = [line for line in sys.stdin.read().split("\\n") if line]
print(TextTokenizer.train(caps, vocab_size=300, text_len=12).fingerprint)
"""


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=300, text_len=12)


def test_training_is_deterministic_across_processes(bpe):
    # Separate interpreters with different hash seeds: no dict or thread order may leak in.
    prints = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "RAYON_NUM_THREADS": seed}
        out = subprocess.run(
            [sys.executable, "-c", TRAIN_SNIPPET],
            input="\n".join(CAPTIONS),
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        prints.add(out.stdout.strip())
    assert prints == {bpe.fingerprint}


def test_different_captions_give_a_different_tokenizer(bpe):
    other = TextTokenizer.train([c.upper() + " zebra" for c in CAPTIONS], 300, 12, lowercase=False)
    assert other.fingerprint != bpe.fingerprint


def test_encode_pads_and_truncates(bpe):
    short, long = "seven", " ".join(["a photo of the digit seven"] * 10)
    ids = bpe.encode([short, long, ""])
    assert ids.dtype == np.int32 and ids.shape == (3, 12)
    n_short = int((ids[0] != PAD_ID).sum())
    assert 1 <= n_short < 12 and (ids[0, n_short:] == PAD_ID).all()
    assert (ids[1] != PAD_ID).all()  # truncated, not padded
    assert (ids[2] == PAD_ID).all()
    assert bpe.decode(ids[:1]) == ["seven"]
    # A truncated caption starts like its full encoding.
    assert (bpe.encode([long[:40]])[0, :4] == ids[1, :4]).all()


def test_lengths_and_truncation_warnings(bpe):
    short, long = "the number 7", " ".join(["a photo of the digit seven"] * 3)
    n_short, n_long = bpe.lengths([short, long])
    assert n_short == int((bpe.encode([short]) != PAD_ID).sum()) and n_long > bpe.text_len
    (line,) = bpe.truncation_warnings([short, long])  # only the long one
    kept = bpe.decode(bpe.encode([long]))[0]
    assert repr(long) in line and f"{n_long} tokens" in line and repr(kept) in line
    clip = TextTokenizer.open_clip(text_len=8)
    assert clip.lengths(["two", "a b c d e f g"]) == [3, 9]  # + start/end tokens
    assert len(clip.truncation_warnings(["two", "a b c d e f g"])) == 1


def test_ids_in_range_for_any_text(bpe):
    ids = bpe.encode(["ÜNÎCØDÉ ✓ 数字 seven", "\x00\t\n", "zzzz qqqq 12345"])
    assert ids.min() >= 0 and ids.max() < bpe.vocab_size
    assert bpe.vocab_size == 300
    # the trained captions compress: fewer ids than characters
    assert (bpe.encode(["a photo of the digit seven"])[0] != PAD_ID).sum() < 12


def test_save_load_round_trip(bpe, tmp_path):
    path = tmp_path / "tok.json"
    bpe.save(str(path))
    back = TextTokenizer.load(str(path))
    assert back.fingerprint == bpe.fingerprint
    assert back.describe() == bpe.describe()
    batch = CAPTIONS[:20] + ["unseen words here"]
    np.testing.assert_array_equal(back.encode(batch), bpe.encode(batch))
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == bpe.fingerprint


def test_load_refuses_unknown_version(bpe, tmp_path):
    doc = json.loads(bpe.to_bytes())
    doc["version"] = 99
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"tok\.json.*version 99"):
        TextTokenizer.load(str(path))


def test_open_clip_kind():
    tok = TextTokenizer.open_clip(text_len=8)
    ids = tok.encode(["a photo of the digit seven and some more words here", "two"])
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    assert ids.max() < tok.vocab_size == 49408
    assert ids[1, 3] == PAD_ID and tok.decode(ids[1:]) == ["two"]
    again = TextTokenizer.from_bytes(tok.to_bytes())
    assert again.fingerprint == tok.fingerprint


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(CAPTIONS, vocab_size=100, text_len=8)


def test_load_text_tokenizer_via_manifest(bpe, tmp_path):
    bpe.save(str(tmp_path / "text_tokenizer.json"))
    manifest = {
        "format": "ray-t2i/tokens",
        "version": 1,
        "text_tokenizer": {"file": "text_tokenizer.json", "fingerprint": bpe.fingerprint},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_text_tokenizer(str(tmp_path)).fingerprint == bpe.fingerprint

    manifest["text_tokenizer"]["fingerprint"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="text_tokenizer.json.*differs"):
        load_text_tokenizer(str(tmp_path))
