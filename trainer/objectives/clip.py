"""The CLIP objective: an open_clip model trained with open_clip's contrastive loss on
image-text shards. Its exported `model.safetensors` loads with
`open_clip.create_model_and_transforms(name, pretrained=path)` (after registering the JSON of a
custom architecture), which is how `t2i preprocess` and sample reranking use it."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.columns import CAPTION, PIXELS
from trainer.config import TrainConfig
from trainer.engine import export_module_state
from trainer.objectives.common import shard_dataset

TEXT = "text"  # int64 (B, context_length): open_clip BPE tokens


def open_clip_arch(model: str, model_config: str) -> dict:
    """Register a custom architecture JSON (if given) in this process; return the architecture
    (`trainer.pretrained.clip_models`, the one home of open_clip loading)."""
    from trainer.pretrained import clip_models

    custom = clip_models.load_model_config_file(model_config) if model_config else None
    return clip_models.open_clip_arch(model, custom)


class ClipTokenize:
    """Ray Data stage: captions -> open_clip tokens; images stay uint8 (normalised in the loss)."""

    def __init__(self, model: str, model_config: str):
        import open_clip

        open_clip_arch(model, model_config)
        self.tokenizer = open_clip.get_tokenizer(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer([str(c) for c in batch[CAPTION]]).numpy().astype(np.int64)
        return {PIXELS: np.stack(batch[PIXELS]), TEXT: tokens}


class ClipObjective:
    name = "clip"
    # CPUs its data path holds at once: a shard reader task + the ClipTokenize actor (1 each).
    data_cpus_min = 2.0

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.arch = open_clip_arch(cfg.clip.model, cfg.clip.model_config)
        v, t = self.arch["vision_cfg"], self.arch["text_cfg"]
        size = v["image_size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.patches = (self.image_size // v["patch_size"]) ** 2 + 1  # + class token
        self.context = int(t.get("context_length", 77))
        self._flops_per_token = 0.0
        self._loss = None

    def build_model(self) -> torch.nn.Module:
        import open_clip

        open_clip_arch(self.cfg.clip.model, self.cfg.clip.model_config)  # this worker's registry
        model = open_clip.create_model(self.cfg.clip.model, pretrained=None)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # FLOPs per token: 6 x the parameters of the tower that token passes through.
        pv = sum(p.numel() for p in model.visual.parameters())
        pt = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
        self._flops_per_token = (
            6.0 * (pv * self.patches + pt * self.context) / (self.patches + self.context)
        )
        return model

    def dataset(self):
        ds = shard_dataset(self.cfg, self.name, size=self.image_size)
        return ds.map_batches(
            ClipTokenize,
            fn_constructor_args=(self.cfg.clip.model, self.cfg.clip.model_config),
            batch_size=256,
            concurrency=1,
            batch_format="numpy",
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 in [0, 1] -> CLIP-normalised, on x's device. Ray Train delivers
        batches on the worker's GPU: the fp32 constants move there once (kept fp32, not cast
        with the model like a buffer would be under bf16)."""
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std

    def loss(self, engine, batch: dict[str, torch.Tensor]):
        import torch.distributed as dist
        from open_clip.loss import ClipLoss

        if self._loss is None:
            rank, world = (
                (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            )
            self._loss = ClipLoss(rank=rank, world_size=world)  # negatives from every rank
        dtype = next(engine.module.parameters()).dtype
        x = batch[PIXELS].permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, S, S) in [0, 1]
        x = self.normalize(x).to(dtype)
        image_f, text_f, scale = engine(x, batch[TEXT].long())
        loss = self._loss(image_f.float(), text_f.float(), scale.float())
        with torch.no_grad():
            sims = image_f.float() @ text_f.float().T  # (B, B) local batch
            acc = (sims.argmax(dim=1) == torch.arange(len(sims), device=sims.device)).float().mean()
        return loss, {"acc_i2t": acc, "logit_scale": scale.detach().float()}

    def tokens_in_batch(self, batch) -> int:
        return int(batch[PIXELS].shape[0]) * (self.patches + self.context)

    def flops_per_token(self) -> float:
        return self._flops_per_token

    def export_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        return export_module_state(engine)
