"""`t2i tokenize recipe=ldm pretrained=DIR`: a diffusers Stable Diffusion pipeline folder (local or
s3://) fills the image tokenizer (its `vae/`), the text tokenizer (its `tokenizer/`, kept whole in
the dataset's text tokenizer file) and the text encoder (its `text_encoder/`, run as its pipeline
runs it: `trainer.pretrained.diffusers_sd`). The manifest records the folder's URI, each part's
path and the sha256 of its weights."""

from __future__ import annotations

import os

from data_pipeline import fs
from data_pipeline.text_tokens import TextTokenizer


def absolute(uri: str) -> str:
    """`uri` with a local path made absolute (Ray workers run elsewhere); s3:// and "" as is."""
    return uri if not uri or "://" in uri else os.path.abspath(uri)


def _join(uri: str, part: str) -> str:
    return uri.rstrip("/") + "/" + part


_ROOTS: dict[str, str] = {}  # pipeline URI -> its local folder, in this process


def root(cfg) -> str:
    """The pipeline folder on this node's disk (s3://: fetched once per node)."""
    from trainer.pretrained.diffusers_sd import local_copy

    uri = absolute(cfg.pretrained)
    if uri not in _ROOTS:
        _ROOTS[uri] = local_copy(uri, cfg.storage, what="pretrained").path
    return _ROOTS[uri]


def image_tokenizer_path(cfg) -> str:
    """`image_tokenizer.path`, else the pipeline's `vae/` (absolute, for Ray workers)."""
    if cfg.image_tokenizer.path or not cfg.pretrained:
        return cfg.image_tokenizer.path
    uri = absolute(cfg.pretrained)
    vae = _join(uri, "vae")
    return vae if fs.exists(fs.resolve(_join(vae, "config.json"), storage=cfg.storage)) else uri


def text_tokenizer(cfg) -> TextTokenizer:
    from trainer.pretrained.diffusers_sd import TOKENIZER, part_dir

    return TextTokenizer.clip_folder(part_dir(root(cfg), TOKENIZER))


def describe_text_encoder(cfg, text: TextTokenizer) -> tuple[int, dict]:
    """(text width, the manifest's `text_encoder` entry) of the pipeline's text encoder."""
    from trainer.pretrained.diffusers_sd import load_text_encoder

    enc = load_text_encoder(root(cfg))
    if enc.text_len != text.text_len:
        raise ValueError(
            f"pretrained {cfg.pretrained}: the tokenizer pads to {text.text_len} but the text "
            f"encoder's tokenizer to {enc.text_len}"
        )
    return enc.width, {
        "kind": "transformers_clip",
        "pretrained": absolute(cfg.pretrained),  # encodes prompts at sampling
        "checkpoint": enc.path,
        "checkpoint_sha256": enc.fingerprint,
        "use_attention_mask": enc.use_attention_mask,
        "model": "CLIPTextModel",
    }
