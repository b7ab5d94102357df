"""Tiny, untrained stand-ins for everything `t2i sample` reads: a token dataset's text tokenizer,
an image tokenizer directory, a DALL-E run. Shared by the sample, eval and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.config import load_config, to_yaml
from data_pipeline.digits import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption_for
from data_pipeline.fs import file_digest
from data_pipeline.text_tokens import MANIFEST_KEY, TextTokenizer
from data_pipeline.token_dataset import FORMAT, VERSION
from trainer.config import TrainConfig
from trainer.models.dalle import DalleTransformer, dalle_preset
from trainer.models.dvae import DvaeConfig, DvaeTokenizer
from trainer.sampling.config import SampleConfig

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


# -- latent diffusion --------------------------------------------------------------------------

LDM_TEXT_LEN = 8
TEXT_ENCODER = {  # a tiny open_clip architecture (random weights: no checkpoint)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": LDM_TEXT_LEN, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}  # fmt: skip


def make_klae(root: Path, seed: int = 0, scale: float = 0.8) -> Path:
    """A freshly initialised tiny KL-AE export: 16-px images <-> 4x4x4 latents."""
    from trainer.models.klae import SCALE_KEY, KlaeConfig, KlaeTokenizer

    torch.manual_seed(seed)
    cfg = KlaeConfig(image_size=16, block_out_channels=[8, 16, 16], norm_num_groups=4,
                     latent_channels=4)  # fmt: skip
    tok = KlaeTokenizer(cfg)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in tok.state_dict().items()}
    save_file({**state, SCALE_KEY: torch.tensor(scale)}, str(root / "model.safetensors"))
    (root / "config.yaml").write_text(to_yaml(TrainConfig(name="klae-tiny", objective="klae",
                                                          klae=cfg)))  # fmt: skip
    return root


def make_latents(root: Path, klae: Path) -> dict:
    """A latent-dataset directory holding what sampling reads: manifest (v2), the open_clip text
    tokenizer and the empty-caption states of the (random) tiny text encoder."""
    import hashlib

    from data_pipeline import token_dataset as T
    from data_pipeline.tokenize.stages import EmbedText, TextEncoderSpec

    tok = TextTokenizer.open_clip(LDM_TEXT_LEN)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "text_tokenizer.json"))
    ids = tok.encode([""])
    spec = TextEncoderSpec("tiny", TEXT_ENCODER, "", 4, 1)
    states = EmbedText(spec).encode(ids).reshape(LDM_TEXT_LEN, -1)
    data = T.empty_caption_bytes(states, ids[0] != tok.pad_id)
    (root / T.EMPTY_CAPTION_FILE).write_bytes(data)
    manifest = {
        "format": T.LATENT_FORMAT,
        "version": T.LATENT_VERSION,
        "shards": [],
        MANIFEST_KEY: {"file": "text_tokenizer.json", **tok.describe()},
        "text_pad_id": tok.pad_id,
        "image_tokenizer": {"kind": "klae", "path": str(klae), "scaling_factor": 0.8,
                            "fingerprint": file_digest(str(klae / "model.safetensors"))[1]},
        "latent_shape": [4, 4, 4],
        "scaling_factor": 0.8,
        "text_embedding_shape": [LDM_TEXT_LEN, TEXT_ENCODER["text_cfg"]["width"]],
        "text_encoder": {"model": "tiny", "model_config": TEXT_ENCODER, "checkpoint": "",
                         "checkpoint_sha256": ""},
        "empty_caption": {"file": T.EMPTY_CAPTION_FILE,
                          "sha256": hashlib.sha256(data).hexdigest()},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def make_ldm(root: Path, latents: Path, seed: int = 0) -> Path:
    """A random tiny U-Net as an exported `objective=ldm` checkpoint directory."""
    from data_pipeline.token_dataset import EMPTY_CAPTION_FILE
    from trainer.models.unet import Unet, unet_preset

    torch.manual_seed(seed)
    cfg = unet_preset("tiny", sample_size=4, cross_attention_dim=TEXT_ENCODER["text_cfg"]["width"])
    model = Unet(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "model.safetensors"))  # fmt: skip
    (root / "config.yaml").write_text(to_yaml(TrainConfig(name="ldm-tiny", objective="ldm",
                                                          unet=cfg)))  # fmt: skip
    (root / EMPTY_CAPTION_FILE).write_bytes((latents / EMPTY_CAPTION_FILE).read_bytes())
    return root


def make_ldm_inputs(root: Path) -> dict[str, str]:
    """{recipe, tokens, image_tokenizer, model} of a complete tiny latent-diffusion setup."""
    klae = make_klae(root / "klae")
    make_latents(root / "latents", klae)
    return {
        "recipe": "ldm",
        "tokens": str(root / "latents"),
        "image_tokenizer": str(klae),
        "model": str(make_ldm(root / "ldm", root / "latents")),
    }


def sample_config(inputs: dict[str, str], out, *overrides: str) -> SampleConfig:
    """A `t2i sample` config reading `inputs` (`make_sample_inputs` / `make_ldm_inputs`) and
    writing to `out`: 3 prompts, 3 candidates each, the best 2 kept, fp32, one CPU."""
    base = [f"{k}={v}" for k, v in inputs.items()]
    base += [f"output={out}", f"sample.prompts={json.dumps(DIGIT_PROMPTS[:3])}"]
    base += ["sample.candidates=3", "sample.keep=2", "precision=fp32", "num_cpus=1"]
    base += ["clip.allow_random=true"]  # the reranker's tiny CLIP has random weights
    return load_config(SampleConfig, None, base + list(overrides))
