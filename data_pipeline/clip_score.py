"""CLIP scoring on a Ray actor pool: cosine(image, text) and the image embedding per sample.

The model is an open_clip model named in the config, built from a built-in architecture or a
custom model-config JSON (registered with `open_clip.add_model_config`), with weights from a local
open_clip checkpoint loaded with `weights_only=True` (open_clip's loader; no pickle execution).
Nothing is downloaded: a checkpoint must be a local file, and an empty one means random weights
(benchmarks only).

Determinism: every forward pass sees exactly `batch_size` rows (short batches are zero-padded).
A row's result then does not depend on which other rows share its batch, which Ray Data does not
fix between runs, so a resumed run scores every sample bit-identically to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from data_pipeline import columns as C
from data_pipeline.devices import assigned_device
from data_pipeline.filters import clip_reason


@dataclass
class OpenClipSection:
    """Config fields naming an open_clip model from local files (nothing is downloaded): the base
    of every section that names one (`t2i preprocess` and `t2i sample` `clip:`, `t2i tokenize`
    `text_encoder:`, `t2i train` `clip:`), which add their own fields (weights, batch size, ...)
    and may change these defaults."""

    model: str = "ViT-B-32"  # open_clip architecture: a built-in name, or model_config's stem
    model_config: str = ""  # custom architecture: an open_clip model-config JSON; "": built-in

    def load_model_config(self) -> dict | None:
        """The custom architecture read from `model_config`, or None for a built-in one."""
        return load_model_config_file(self.model_config) if self.model_config else None


@dataclass(frozen=True)
class ClipSpec:
    """Everything an actor needs to rebuild the model (plain data: crosses the Ray boundary)."""

    model: str  # open_clip model name
    model_config: dict | None  # custom architecture (open_clip model-config dict) or None
    checkpoint: str  # local file path or ""
    batch_size: int
    threads: int


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


def clip_image_size(spec: ClipSpec) -> int:
    """The square input side of the model's image tower."""
    size = open_clip_config(spec)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def open_clip_config(spec: ClipSpec) -> dict:
    """The open_clip architecture dict for `spec` (registers a custom one first)."""
    import open_clip

    if spec.model_config is not None:
        register_model_config(spec.model, spec.model_config)
    cfg = open_clip.get_model_config(spec.model)
    if cfg is None:
        raise ValueError(f"clip.model: unknown open_clip model {spec.model!r}")
    return cfg


def build_clip(spec: ClipSpec, device: str = "cpu"):
    """(model in eval mode, tokenizer, mean, std) for `spec`; never downloads."""
    import open_clip
    import torch

    if spec.model_config is not None:
        register_model_config(spec.model, spec.model_config)
    if spec.checkpoint and not os.path.isfile(spec.checkpoint):
        raise FileNotFoundError(f"clip.checkpoint: no such file {spec.checkpoint!r}")
    # Seeded so that random weights (no checkpoint: benchmarks, tests) are the same in every
    # actor and every run; with a checkpoint every weight is overwritten anyway.
    torch.manual_seed(0)
    model = open_clip.create_model(
        spec.model, pretrained=spec.checkpoint or None, device=device, load_weights=True
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.model)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return model, tokenizer, tuple(mean), tuple(std)


class ClipScorer:
    """Ray Data actor stage: adds `clip_score` (cosine) and `embedding` for rows still valid.

    Rows already quarantined pass through with NaN / zeros; the `pixels` column is consumed.
    """

    def __init__(self, spec: ClipSpec):
        import torch

        torch.set_num_threads(max(1, spec.threads))
        self.device = assigned_device()  # the GPU only if Ray gave this actor one
        self.spec = spec
        self.model, self.tokenizer, mean, std = build_clip(spec, self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.dim = int(open_clip_config(spec)["embed_dim"])

    def encode(self, pixels: np.ndarray, captions: list[str]):
        """(B, S, S, 3) uint8 + B captions -> image (B, D), text (B, D) L2-normalised, padded."""
        import torch

        b = len(captions)
        pad = self.spec.batch_size - b
        if pad > 0:  # fixed-shape forward passes: results independent of batch composition
            pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), np.uint8)])
            captions = list(captions) + [""] * pad
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) in [0, 1]
            x = (x - self.mean) / self.std
            tokens = self.tokenizer(captions).to(self.device)
            img = self.model.encode_image(x, normalize=True)
            txt = self.model.encode_text(tokens, normalize=True)
        return img[:b].float().cpu().numpy(), txt[:b].float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[C.KEY])
        ok = np.flatnonzero(batch[C.REASON] == "")
        scores = np.full(n, np.nan, np.float32)
        emb = np.zeros((n, self.dim), np.float32)
        for start in range(0, len(ok), self.spec.batch_size):
            idx = ok[start : start + self.spec.batch_size]
            img, txt = self.encode(batch[C.PIXELS][idx], [str(c) for c in batch[C.CAPTION][idx]])
            emb[idx] = img
            scores[idx] = (img * txt).sum(axis=1)
        out = {k: v for k, v in batch.items() if k != C.PIXELS}
        out[C.CLIP_SCORE] = scores
        out[C.EMBEDDING] = emb
        return out


class ApplyClipThreshold:
    """CPU stage after scoring: quarantine rows under the threshold (kept separate so the actor
    pool only runs the model)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reasons = batch[C.REASON].astype(object)
        details = batch[C.DETAIL].astype(object)
        for i in np.flatnonzero(reasons == ""):
            reasons[i], details[i] = clip_reason(float(batch[C.CLIP_SCORE][i]), self.threshold)
        return {**batch, C.REASON: reasons.astype(str), C.DETAIL: details.astype(str)}
