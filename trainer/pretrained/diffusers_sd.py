"""Stable Diffusion pipeline folders (diffusers layout), loaded strictly and weights-only.

    <pipeline>/model_index.json
               text_encoder/  config.json + model.safetensors | pytorch_model.bin   (CLIPTextModel)
               tokenizer/     vocab.json, merges.txt, tokenizer_config.json, ...    (CLIPTokenizer)
               vae/           config.json + diffusion_pytorch_model.safetensors | .bin
               unet/          config.json + diffusion_pytorch_model.safetensors | .bin
               scheduler/     scheduler_config.json

A `transformers` CLIPTextModel folder holding its tokenizer files also serves as a text encoder,
and a model folder itself (`unet/`, `vae/`) as that part. Paths may be local or s3:// (fetched
once per node into a cache, `data_pipeline.fs.fetch_checkpoint`).

SD's text conditioning: the tokenizer pads to its `model_max_length` ("max_length" padding,
truncation), the text encoder runs with no attention mask unless its config says
`use_attention_mask`, and the conditioning is `last_hidden_state` (after the final LayerNorm).
SD-2's penultimate-layer conditioning is already in its folder: its text_encoder/config.json has
23 of OpenCLIP's 24 layers. This is what `StableDiffusionPipeline.encode_prompt` computes.

Every weight name is checked: a missing or unexpected name is an error naming it and the file.
The transformers-4 layout (`text_model.` prefixes, the `position_ids` buffer) is read too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline import fs
from trainer.models.image_tokenizer import load_strict
from trainer.pretrained.weights import DIFFUSERS_WEIGHT_NAMES, load_weights

MODEL_INDEX = "model_index.json"
TEXT_ENCODER, TOKENIZER, VAE, UNET, SCHEDULER = (
    "text_encoder",
    "tokenizer",
    "vae",
    "unet",
    "scheduler",
)
TRANSFORMERS_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
CONFIG = "config.json"


def local_copy(path: str, storage=None, *, what: str = "pretrained") -> fs.LocalCopy:
    """A local directory for `path` (s3://: fetched once per node) and its tree sha256."""
    copy = fs.fetch_checkpoint(path, storage=storage, what=what)
    if not copy.is_dir:
        raise ValueError(f"{what}: {copy.uri} is a file; expected a pipeline or model folder")
    return copy


def part_dir(root: str, part: str) -> str:
    """`root/part` when `root` is a pipeline folder (or holds `part/`), else `root` itself."""
    sub = os.path.join(root, part)
    return sub if os.path.isdir(sub) else root


def _weights_file(folder: str, names: tuple[str, ...], what: str) -> str:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    index = (
        [n for n in os.listdir(folder) if n.endswith(".index.json")]
        if os.path.isdir(folder)
        else []
    )
    if index:
        raise ValueError(
            f"{os.path.join(folder, index[0])}: sharded {what} weights are not supported; "
            f"merge them into one {names[0]}"
        )
    raise FileNotFoundError(
        f"{os.path.join(folder, names[0])}: missing ({what} weights: expected {' or '.join(names)})"
    )


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing ({what} config)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a weights file, read weights-only."""
    with open(path, "rb") as f:
        data = f.read()
    return load_weights(data, path), hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Text encoder + tokenizer
# --------------------------------------------------------------------------------------------


def _transformers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-4 CLIPTextModel names (`text_model.` prefix, a saved `position_ids` buffer)
    -> the names of the installed CLIPTextModel."""
    out = {}
    for k, v in state.items():
        if k.endswith("embeddings.position_ids"):
            continue  # a buffer transformers 4 saved; recomputed by the module
        out[k.removeprefix("text_model.")] = v
    return out


@dataclass
class SdTextEncoder:
    """A CLIPTextModel + its CLIPTokenizer, encoding captions as a SD pipeline does."""

    model: torch.nn.Module
    tokenizer: object
    use_attention_mask: bool
    fingerprint: str  # sha256 of the text encoder's weights file
    path: str  # the text encoder's weights file
    tokenizer_dir: str

    @property
    def text_len(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 (N, L), attention mask bool (N, L)): max_length padding, truncation."""
        enc = self.tokenizer(
            [str(t) for t in texts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            return_tensors="np",
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L) ids -> (N, L, width) last_hidden_state; `mask` used only when the encoder's
        config says use_attention_mask (SD pipelines pass none otherwise)."""
        device = next(self.model.parameters()).device
        attn = mask.to(device).long() if (self.use_attention_mask and mask is not None) else None
        return self.model(ids.to(device).long(), attention_mask=attn)[0]


def load_text_encoder(root: str, device: str | torch.device = "cpu") -> SdTextEncoder:
    """The text encoder + tokenizer of a pipeline folder (or a CLIPTextModel folder holding its
    tokenizer files), strictly loaded, in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    te_dir, tok_dir = part_dir(root, TEXT_ENCODER), part_dir(root, TOKENIZER)
    config = _read_json(os.path.join(te_dir, CONFIG), "text encoder")
    if config.get("model_type") not in (None, "clip_text_model") or config.get(
        "architectures", ["CLIPTextModel"]
    ) != ["CLIPTextModel"]:
        raise ValueError(
            f"{os.path.join(te_dir, CONFIG)}: not a CLIPTextModel (architectures "
            f"{config.get('architectures')}, model_type {config.get('model_type')!r})"
        )
    path = _weights_file(te_dir, TRANSFORMERS_WEIGHT_NAMES, "text encoder")
    state, digest = read_weights(path)
    model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    load_strict(model, _transformers_layout(state), what=path, layout="CLIPTextModel")
    if not any(os.path.isfile(os.path.join(tok_dir, n)) for n in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(
            f"{os.path.join(tok_dir, 'vocab.json')}: missing (CLIPTokenizer files: vocab.json + "
            f"merges.txt or tokenizer.json)"
        )
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return SdTextEncoder(
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        use_attention_mask=bool(config.get("use_attention_mask", False)),
        fingerprint=digest,
        path=path,
        tokenizer_dir=tok_dir,
    )


# --------------------------------------------------------------------------------------------
# VAE and U-Net
# --------------------------------------------------------------------------------------------


def load_vae(root: str, device: str | torch.device = "cpu"):
    """The KL autoencoder of a pipeline folder's `vae/` (or a diffusers AutoencoderKL folder)."""
    from trainer.pretrained.image_tokenizers import load_diffusers_klae

    return load_diffusers_klae(fs.resolve(part_dir(root, VAE)), device)


def unet_config(config: dict) -> dict:
    """The constructor arguments of a `unet/config.json` (diffusers' private keys dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass
class ReleasedUnet:
    """A released U-Net to start from (`ldm.init_from`), its names and shapes checked."""

    uri: str  # what the user named
    root: str  # local folder (a pipeline folder, or the U-Net folder itself)
    is_pipeline: bool  # root holds model_index.json (text_encoder/, tokenizer/, vae/ beside)
    config: dict  # unet/config.json as read
    config_path: str
    weights: str  # local weights file
    sha256: str  # the folder's tree digest

    @property
    def unet_config(self) -> dict:
        return unet_config(self.config)


def released_unet(path: str, storage=None, *, what: str = "ldm.init_from") -> ReleasedUnet:
    """Fetch (s3://) and check a pipeline folder or `unet/` folder: config.json and every weight
    name and shape against the UNet2DConditionModel it describes (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    from trainer.pretrained.weights import LazyTensors, check_names

    copy = local_copy(path, storage, what=what)
    folder = part_dir(copy.path, UNET)
    config_path = os.path.join(folder, CONFIG)
    config = _read_json(config_path, "U-Net")
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(
            f"{config_path}: _class_name is {config['_class_name']!r}, expected "
            f"UNet2DConditionModel"
        )
    weights = _weights_file(folder, DIFFUSERS_WEIGHT_NAMES, "U-Net")
    try:
        with torch.device("meta"):
            model = UNet2DConditionModel(**unet_config(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: not a UNet2DConditionModel config: {e}") from None
    check_names(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, LazyTensors(weights), ""
    )
    return ReleasedUnet(
        uri=copy.uri,
        root=copy.path,
        is_pipeline=os.path.isfile(os.path.join(copy.path, MODEL_INDEX)),
        config=config,
        config_path=config_path,
        weights=weights,
        sha256=copy.sha256,
    )
