"""Tiny, untrained stand-ins for everything `t2i sample` reads: a token dataset's text tokenizer,
an image tokenizer directory, a DALL-E run. Shared by the sample, eval and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption_for
from data_pipeline.fs import file_digest
from data_pipeline.text_tokens import MANIFEST_KEY, TextTokenizer
from data_pipeline.token_dataset import FORMAT, VERSION
from trainer.config import TrainConfig, to_yaml
from trainer.models.dalle import DalleTransformer, dalle_preset
from trainer.models.dvae import DvaeConfig, DvaeTokenizer

TEXT_LEN = 8
GRID = 4  # 16 code tokens per image
IMAGE_VOCAB = 64
DIGIT_PROMPTS = [
    caption_for(d, t)
    for t in TRAIN_TEMPLATES[:1] + HELDOUT_TEMPLATES[:1]
    for d in range(len(DIGIT_WORDS))
]


def make_tokens(root: Path, image_tokenizer: Path, text_len: int = TEXT_LEN) -> TextTokenizer:
    """A token-dataset directory holding only what sampling reads: the manifest (with the image
    tokenizer's fingerprint) and the text tokenizer."""
    captions = [caption_for(d, t) for t in TRAIN_TEMPLATES for d in range(10)]
    tok = TextTokenizer.train(captions, vocab_size=300, text_len=text_len)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "text_tokenizer.json"))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "shards": [],
        MANIFEST_KEY: {"file": "text_tokenizer.json", "fingerprint": tok.fingerprint},
        "image_tokenizer": {
            "kind": "dvae",
            "fingerprint": file_digest(str(image_tokenizer / "model.safetensors"))[1],
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tok


def make_dvae(root: Path, seed: int = 0) -> Path:
    """A freshly initialised tiny dVAE tokenizer directory: 16-px images <-> 4x4 codes of 64."""
    torch.manual_seed(seed)
    cfg = DvaeConfig(
        image_size=GRID * 4,
        group_count=3,
        n_hid=16,
        n_blk_per_group=1,
        n_init=16,
        vocab_size=IMAGE_VOCAB,
    )
    tok = DvaeTokenizer(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tok.state_dict().items()}, str(root / "model.safetensors")
    )
    (root / "config.yaml").write_text(
        to_yaml(TrainConfig(name="dvae-tiny", objective="dvae", dvae=cfg))
    )
    return root


def make_dalle(root: Path, text_vocab: int, seed: int = 0) -> Path:
    """A random tiny DALL-E as an exported checkpoint directory (weights + config.yaml)."""
    torch.manual_seed(seed)
    cfg = dalle_preset(
        "tiny", text_vocab=text_vocab, text_len=TEXT_LEN, image_vocab=IMAGE_VOCAB, image_grid=GRID
    )
    model = DalleTransformer(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors")
    )
    (root / "config.yaml").write_text(to_yaml(TrainConfig(name="dalle-tiny", dalle=cfg)))
    return root


def make_sample_inputs(root: Path) -> dict[str, str]:
    """{tokens, image_tokenizer, model} paths of a complete tiny sampling setup under `root`."""
    dvae = make_dvae(root / "dvae")
    tok = make_tokens(root / "tokens", dvae)
    return {
        "tokens": str(root / "tokens"),
        "image_tokenizer": str(dvae),
        "model": str(make_dalle(root / "dalle", tok.vocab_size)),
    }
