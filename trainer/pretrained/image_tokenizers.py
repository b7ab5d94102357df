"""Image tokenizers on storage: a run, an exported checkpoint, a `t2i convert` output, or a
diffusers `AutoencoderKL` folder, loaded into the modules of `trainer/models/`.

    tok = load_image_tokenizer("runs/demo/train/dvae-digits")   # a run, a checkpoint, or a
    codes = tok.encode(images)                                 # `t2i convert` output directory
    recon = tok.decode(codes)

Images are float32 tensors (B, 3, H, W) in [0, 1] (H and W multiples of `tok.downsample`).
Discrete tokenizers return int64 codes (B, H/f, W/f) in [0, vocab_size); the KL autoencoder returns
latents (B, C, H/f, W/f) already multiplied by its `scaling_factor` (so they have ~unit variance,
as latent diffusion expects) and `decode` undoes that scaling.

A tokenizer directory holds `model.safetensors` (the model's own state dict) and `config.yaml` (a
`t2i train` config whose `objective` names the kind and whose section of that name is its shape;
only that section is read, into the shape dataclass of `trainer/models/`). Every exported
`t2i train` checkpoint is such a directory, and so is what `t2i convert` writes
(`trainer/pretrained/converters.py`). A diffusers `AutoencoderKL` directory (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`, as Stable Diffusion's `vae/` folder) loads too,
as a KL-AE with the `scaling_factor` of its config. Weights load strictly (a missing or unexpected
name is an error naming it) and weights-only: nothing that pickles code is ever unpickled.
Local paths and s3:// URIs both work (`data_pipeline.fs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
import yaml

from data_pipeline import fs
from data_pipeline.config import ConfigError, StorageConfig, from_dict
from trainer.models.dvae import DvaeConfig, DvaeTokenizer
from trainer.models.image_tokenizer import CONFIG, WEIGHTS, ImageTokenizer
from trainer.models.klae import DIFFUSERS_CONFIG, KlaeConfig, KlaeTokenizer
from trainer.models.vqgan import VqganConfig, VqganTokenizer
from trainer.pretrained.runs import find_exported
from trainer.pretrained.weights import DIFFUSERS_WEIGHT_NAMES, find_weights, load_weights

# objective name -> (its shape section's dataclass, tokenizer class with `from_state(shape, sd)`)
KINDS: dict[str, tuple[type, type[ImageTokenizer]]] = {
    "dvae": (DvaeConfig, DvaeTokenizer),
    "vqgan": (VqganConfig, VqganTokenizer),
    "klae": (KlaeConfig, KlaeTokenizer),
}


def read_run_config(data: bytes, uri: str) -> dict[str, Any]:
    """A run's `config.yaml` (what `t2i train` or `t2i convert` wrote) as plain data."""
    try:
        doc = yaml.safe_load(data.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{uri}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{uri}: top level must be a mapping, got {type(doc).__name__}")
    return doc


def read_shape(doc: dict[str, Any], schema: type, section: str, uri: str) -> Any:
    """The `section` of a run config as the model-shape dataclass `schema`.

    Runs written before #13 kept training settings in the shape sections (since moved to
    `<section>_train:`, see TrainConfig.RENAMED); keys of the section that are not fields of the
    shape are such settings and are left out (the file was validated when it was written)."""
    raw = doc.get(section) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{uri}: '{section}' must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(schema)} | {"preset"}
    try:
        return from_dict(
            schema, {k: v for k, v in raw.items() if k in names}, source=uri, prefix=section
        )
    except (ConfigError, ValueError, TypeError) as e:
        raise ValueError(f"{uri}: {e}") from None


def _tokenizer_dir(loc: fs.Location) -> fs.Location:
    """`loc` itself when it holds weights + config; else the newest complete checkpoint of the run
    at `loc` that has exported weights."""
    return find_exported(loc, weights=WEIGHTS, config=CONFIG, what="image tokenizer")


def load_image_tokenizer(
    path: str, *, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> ImageTokenizer:
    """Load a dVAE, VQGAN or KL-AE from a local or s3:// directory (see the module docstring).

    Weights load with safetensors (no pickle) and `strict=True`; the tokenizer is in eval mode.
    """
    storage = storage or StorageConfig()
    loc = fs.resolve(path, storage=storage)
    if _is_diffusers_dir(loc):
        return load_diffusers_klae(loc, device)
    src = _tokenizer_dir(loc)
    cfg_uri = src.join(CONFIG).uri
    doc = read_run_config(fs.read_bytes(src.join(CONFIG)), cfg_uri)
    objective = doc.get("objective")
    if objective not in KINDS:
        raise ValueError(
            f"{cfg_uri}: objective {objective!r} is not an image tokenizer "
            f"(expected one of {', '.join(KINDS)})"
        )
    schema, cls = KINDS[objective]
    shape = read_shape(doc, schema, objective, cfg_uri)
    weights = fs.read_bytes(src.join(WEIGHTS))
    tok = cls.from_state(shape, load_weights(weights, src.join(WEIGHTS).uri))
    tok.fingerprint = hashlib.sha256(weights).hexdigest()
    return tok.to(device).eval()


def _is_diffusers_dir(loc: fs.Location) -> bool:
    return fs.exists(loc.join(DIFFUSERS_CONFIG)) and any(
        fs.exists(loc.join(n)) for n in DIFFUSERS_WEIGHT_NAMES
    )


def load_diffusers_klae(loc: fs.Location, device: str | torch.device = "cpu") -> KlaeTokenizer:
    """A diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors, or
    the .bin a `save_pretrained(safe_serialization=False)` writes, read weights-only)."""
    cfg_loc = loc.join(DIFFUSERS_CONFIG)
    try:
        config = json.loads(fs.read_bytes(cfg_loc))
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_loc.uri}: missing (a diffusers VAE folder)") from None
    except ValueError as e:
        raise ValueError(f"{cfg_loc.uri}: not valid JSON: {e}") from None
    wloc = find_weights(loc, what="VAE")
    weights = fs.read_bytes(wloc)
    tok = KlaeTokenizer.from_diffusers(config, load_weights(weights, wloc.uri), source=cfg_loc.uri)
    tok.fingerprint = hashlib.sha256(weights).hexdigest()
    return tok.to(device).eval()


def read_init_state(path: str, storage: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The weights of `vqgan_train.init_from`: a safetensors file or a directory holding one
    (`storage`: the job's S3 endpoint, region, retries and timeouts)."""
    loc = fs.resolve(path, storage=storage)
    if not path.endswith(".safetensors"):
        loc = loc.join(WEIGHTS)
    return load_weights(fs.read_bytes(loc), loc.uri)
