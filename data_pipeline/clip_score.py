"""CLIP scoring on a Ray actor pool: cosine(image, text) and the image embedding per sample.

The model is an open_clip model named in the config, built by `trainer.pretrained.clip_models`
(a built-in architecture or a custom model-config JSON; weights from a local or s3:// checkpoint,
read weights-only with every name checked, and the OpenAI QuickGELU trap refused). An empty
checkpoint means random weights (tests and benchmarks only).

Determinism: every forward pass sees exactly `batch_size` rows (short batches are zero-padded).
A row's result then does not depend on which other rows share its batch, which Ray Data does not
fix between runs, so a resumed run scores every sample bit-identically to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline import columns as C
from data_pipeline.devices import assigned_device
from data_pipeline.filters import clip_reason
from trainer.pretrained.clip_models import (  # noqa: F401 - re-exported for the stages' users
    ClipSpec,
    build_clip,
    clip_image_size,
    load_model_config_file,
    open_clip_config,
    register_model_config,
)


@dataclass
class OpenClipSection:
    """Config fields naming an open_clip model (nothing is downloaded from a hub): the base
    of every section that names one (`t2i preprocess` and `t2i sample` `clip:`, `t2i tokenize`
    `text_encoder:`, `t2i train` `clip:`), which add their own fields (weights, batch size, ...)
    and may change these defaults."""

    model: str = "ViT-B-32"  # open_clip architecture: a built-in name, or model_config's stem
    model_config: str = ""  # custom architecture: an open_clip model-config JSON; "": built-in

    def load_model_config(self) -> dict | None:
        """The custom architecture read from `model_config`, or None for a built-in one."""
        return load_model_config_file(self.model_config) if self.model_config else None


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
