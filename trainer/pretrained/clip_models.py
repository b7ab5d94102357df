"""open_clip models from released or user weights: the one place that builds an open_clip model
and loads a checkpoint into it (CLIP scoring in `t2i preprocess`, the text encoder of `t2i
tokenize` recipe=ldm, the reranker of `t2i sample`).

- Architectures: a built-in open_clip name or a custom model-config JSON (registered with
  `open_clip.add_model_config` in each process that builds the model).
- Weights: a local file or `s3://` (fetched once per node by `data_pipeline.fs.fetch_checkpoint`),
  read weights-only (safetensors, or `torch.load(weights_only=True)`; TorchScript archives are
  refused: loading one runs its code), every name checked (`strict=True`).
- The OpenAI QuickGELU trap: OpenAI's CLIP weights were trained with QuickGELU
  (x * sigmoid(1.702 x)); open_clip builds `ViT-B-32` with GELU and, given a file path, warns about
  nothing, so every score shifts and LAION's thresholds (0.28 for B/32) no longer apply. The
  activation the weights were trained with is taken from the checkpoint where it says so
  (`checkpoint_activation` in the config, safetensors metadata `quick_gelu`, an
  `open_clip_config.json` beside the file, OpenAI's own markers) and compared with the model's;
  an OpenAI-layout state dict with no such record is refused under a GELU model name, with a
  message naming the QuickGELU variant (`ViT-B-32-quickgelu`).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Literal

from data_pipeline import fs

Activation = Literal["auto", "gelu", "quick_gelu"]
ACTIVATIONS = ("auto", "gelu", "quick_gelu")
# Keys OpenAI's released CLIP archives carry beside the weights (ints, not parameters); open_clip
# drops them when it loads such a file. Their presence marks an OpenAI-released state dict.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ClipSpec:
    """Everything a process needs to rebuild the model (plain data: crosses the Ray boundary)."""

    model: str  # open_clip model name
    model_config: dict | None  # custom architecture (open_clip model-config dict) or None
    checkpoint: str  # local path or s3:// URI of the weights; "": random weights
    batch_size: int
    threads: int
    # The activation the weights were trained with; "auto": read from the checkpoint (see module)
    checkpoint_activation: str = "auto"
    storage: object | None = None  # the job's StorageConfig, for an s3:// checkpoint


def load_model_config_file(path: str) -> dict:
    """Read an open_clip model-config JSON (must have embed_dim, vision_cfg, text_cfg)."""
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ValueError(f"{path}: not an open_clip model config (embed_dim, vision_cfg, text_cfg)")
    return cfg


def register_model_config(name: str, cfg: dict) -> None:
    """Make `name` a known open_clip architecture in this process."""
    import open_clip

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(path)


def open_clip_config(spec: ClipSpec) -> dict:
    """The open_clip architecture dict for `spec` (registers a custom one first)."""
    return open_clip_arch(spec.model, spec.model_config)


def open_clip_arch(model: str, model_config: dict | None) -> dict:
    """The open_clip architecture dict of a model name (+ custom config dict, registered first)."""
    import open_clip

    if model_config is not None:
        register_model_config(model, model_config)
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"clip.model: unknown open_clip model {model!r}")
    return cfg


def clip_image_size(spec: ClipSpec) -> int:
    """The square input side of the model's image tower."""
    size = open_clip_config(spec)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


# --------------------------------------------------------------------------------------------
# Reading a checkpoint (weights only) and what it says about itself
# --------------------------------------------------------------------------------------------


def is_torchscript(path: str) -> bool:
    """A TorchScript archive (OpenAI's released `ViT-B-32.pt` is one): a zip holding code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())


@dataclass
class Checkpoint:
    """A state dict read weights-only, with what the file says about its origin."""

    state: dict  # name -> tensor (a training checkpoint's "state_dict", "module." stripped)
    metadata: dict  # safetensors header metadata ({} for torch files)
    open_clip_marker: str  # why it is known to come from open_clip training ("" if not)


def read_checkpoint(path: str, what: str = "clip.checkpoint") -> Checkpoint:
    """Weights-only read of an open_clip/OpenAI checkpoint file (safetensors, .pt/.bin/.pth)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            marker = "a t2i train CLIP export" if meta.get("objective") == "clip" else ""
            return Checkpoint({k: f.get_tensor(k) for k in f.keys()}, meta, marker)
    if is_torchscript(path):
        raise ValueError(
            f"{what}: {path} is a TorchScript archive (OpenAI's release format); loading one runs "
            "its code, so it is not read here. Save its state dict once as safetensors (with "
            "torch.jit.load in a trusted session), and name the QuickGELU model (e.g. "
            "ViT-B-32-quickgelu): OpenAI's weights were trained with QuickGELU"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - name the file and why
        raise ValueError(f"{what}: cannot read {path} weights-only: {e}") from e
    marker = ""
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        # open_clip's training script saves {epoch, name, state_dict, optimizer}; OpenAI's
        # releases are never wrapped so.
        marker = "an open_clip training checkpoint ({'state_dict': ...})"
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ValueError(f"{what}: {path} does not hold a state dict (name -> tensor)")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module.") :]: v for k, v in raw.items()}
    return Checkpoint(raw, {}, marker)


def is_openai_layout(state: dict) -> bool:
    """The layout of OpenAI's CLIP (which open_clip's `CLIP` class mirrors): the text tower at top
    level (`positional_embedding`, `token_embedding.weight`, `text_projection`,
    `transformer.resblocks.*`) and the image tower under `visual.`."""
    top = {"positional_embedding", "text_projection", "token_embedding.weight", "ln_final.weight"}
    return top <= set(state) and any(k.startswith("visual.") for k in state)


def trained_activation(path: str, ckpt: Checkpoint, declared: str) -> tuple[bool | None, str]:
    """(trained with QuickGELU?, where that comes from); (None, why unknown) when nothing says."""
    if declared != "auto":
        return declared == "quick_gelu", f"checkpoint_activation: {declared}"
    meta = ckpt.metadata.get("quick_gelu")
    if meta is not None:
        if meta.lower() not in ("true", "false"):
            raise ValueError(f"{path}: safetensors metadata quick_gelu={meta!r} (true or false)")
        return meta.lower() == "true", f"its safetensors metadata quick_gelu={meta}"
    beside = os.path.join(os.path.dirname(path), "open_clip_config.json")
    if os.path.isfile(beside):  # the Hugging Face hub layout of open_clip releases
        with open(beside) as f:
            model_cfg = json.load(f).get("model_cfg", {})
        q = bool(model_cfg.get("quick_gelu", False))
        return q, f"{beside} (model_cfg.quick_gelu={str(q).lower()})"
    extra = [k for k in OPENAI_EXTRA_KEYS if k in ckpt.state]
    if extra:
        return True, f"OpenAI's release keys {extra} (OpenAI trained with QuickGELU)"
    return None, ckpt.open_clip_marker or "nothing in the file records it"


def quickgelu_name(model: str, custom: bool) -> str:
    """How to ask for QuickGELU: open_clip's `<name>-quickgelu` (or the model config's flag)."""
    if custom:
        return f'"quick_gelu": true in the model config of {model}'
    return f"model: {model}-quickgelu"


def check_activation(spec: ClipSpec, path: str, ckpt: Checkpoint, what: str) -> None:
    """Refuse weights whose training activation differs from the model's (see module)."""
    model_quick = bool(open_clip_config(spec).get("quick_gelu", False))
    custom = spec.model_config is not None
    trained, source = trained_activation(path, ckpt, spec.checkpoint_activation)
    if trained is None:
        if model_quick or not is_openai_layout(ckpt.state) or ckpt.open_clip_marker:
            return
        raise ValueError(
            f"{what}: {path} has OpenAI CLIP's layout and no record of the activation it was "
            f"trained with, but {spec.model} uses GELU. OpenAI's weights need QuickGELU: set "
            f"{quickgelu_name(spec.model, custom)}, or, if these "
            "weights were trained with GELU (e.g. a LAION open_clip release), say so with "
            "checkpoint_activation: gelu"
        )
    if trained and not model_quick:
        raise ValueError(
            f"{what}: {path} was trained with QuickGELU ({source}) but {spec.model} uses GELU: "
            f"set {quickgelu_name(spec.model, custom)}"
        )
    if not trained and model_quick:
        base = spec.model.removesuffix("-quickgelu")
        fix = f"model: {base}" if not custom and base != spec.model else '"quick_gelu": false'
        raise ValueError(
            f"{what}: {path} was trained with GELU ({source}) but {spec.model} uses QuickGELU: "
            f"set {fix}"
        )


@dataclass(frozen=True)
class CheckedWeights:
    """A checkpoint fetched to this node and checked against the model: what manifests record."""

    path: str  # local file
    sha256: str
    uri: str


# open_clip's release folders (the Hugging Face hub layout: weights + open_clip_config.json), in
# open_clip's own order of preference.
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                  "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")  # fmt: skip


def fetch_weights(spec: ClipSpec, what: str) -> CheckedWeights:
    """The local weights file of `spec.checkpoint`: a file, or an open_clip release folder
    (fetched whole, so its open_clip_config.json says the activation); s3:// once per node."""
    local = fs.fetch_checkpoint(spec.checkpoint, storage=spec.storage, what=what)
    if not local.is_dir:
        return CheckedWeights(local.path, local.sha256, local.uri)
    for name in FOLDER_WEIGHTS:
        path = os.path.join(local.path, name)
        if os.path.isfile(path):
            return CheckedWeights(path, fs.file_digest(path)[1], f"{local.uri}/{name}")
    raise FileNotFoundError(f"{what}: {local.uri} holds none of {', '.join(FOLDER_WEIGHTS)}")


def check_checkpoint(spec: ClipSpec, what: str = "clip.checkpoint") -> CheckedWeights:
    """Fetch `spec.checkpoint` (s3:// once per node) and check its activation against the model
    without building it: the driver's fail-fast check before any actor starts. `sha256` is the
    weights file's."""
    weights = fetch_weights(spec, what)
    check_activation(spec, weights.path, read_checkpoint(weights.path, what), what)
    return weights


def load_weights(model, spec: ClipSpec, path: str, what: str) -> None:
    """Load a checked checkpoint into an open_clip model, every name strictly."""
    from open_clip.model import convert_to_custom_text_state_dict

    ckpt = read_checkpoint(path, what)
    check_activation(spec, path, ckpt, what)
    state = {k: v for k, v in ckpt.state.items() if k not in OPENAI_EXTRA_KEYS}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # CLIP layout -> CustomTextCLIP
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:  # scalar vs (1,) across versions
        state["logit_scale"] = scale.reshape(model.logit_scale.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{what}: {path} does not match {spec.model}: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )


def build_clip(spec: ClipSpec, device: str = "cpu", what: str = "clip.checkpoint"):
    """(model in eval mode, tokenizer, mean, std) for `spec`; never downloads but an s3://
    checkpoint (to the node cache). `what` names the config key in errors."""
    import open_clip
    import torch

    open_clip_config(spec)  # registers a custom architecture; unknown names fail here
    # Seeded so that random weights (no checkpoint: benchmarks, tests) are the same in every
    # actor and every run; with a checkpoint every weight is overwritten anyway.
    torch.manual_seed(0)
    model = open_clip.create_model(spec.model, pretrained=None, device="cpu")
    if spec.checkpoint:
        load_weights(model, spec, fetch_weights(spec, what).path, what)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(spec.model)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return model, tokenizer, tuple(mean), tuple(std)
