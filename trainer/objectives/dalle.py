"""The DALL-E objective: weighted text/image next-token cross-entropy over token datasets."""

from __future__ import annotations

import torch

from data_pipeline.token_dataset import (
    IMAGE_CODES,
    TEXT_TOKENS,
    check_compatible,
    read_token_dataset,
    synthetic_token_dataset,
)
from trainer.config import TrainConfig
from trainer.engine import export_module_state
from trainer.models.dalle import DalleTransformer, compute_dalle_loss, corrupt_text


class DalleObjective:
    name = "dalle"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model_cfg = cfg.dalle
        self._flops_per_token: float | None = None

    def build_model(self) -> torch.nn.Module:
        model = DalleTransformer(self.model_cfg)
        self._flops_per_token = model.flops_per_token()
        return model

    def dataset(self):
        m, d = self.model_cfg, self.cfg.data
        if d.source == "synthetic":
            return synthetic_token_dataset(
                d.synthetic_samples,
                text_len=m.text_len,
                text_vocab=m.text_vocab,
                image_grid=m.image_grid,
                image_vocab=m.image_vocab,
                seed=self.cfg.seed,
            )
        if not d.path:
            raise ValueError("data.path is required when data.source=tokens")
        ds, manifest = read_token_dataset(d.path, storage=self.cfg.storage)
        check_compatible(
            manifest,
            text_vocab=m.text_vocab,
            text_len=m.text_len,
            image_vocab=m.image_vocab,
            image_grid=m.image_grid,
            source=d.path,
        )
        return ds

    def loss(self, engine, batch: dict[str, torch.Tensor]):
        text, image = batch[TEXT_TOKENS].long(), batch[IMAGE_CODES].long()
        m, t = self.model_cfg, self.cfg.dalle_train
        if engine.module.training:
            text = corrupt_text(
                text,
                pad_id=m.text_pad_id,
                vocab=m.text_vocab,
                insert_p=t.text_insert_p,
                replace_p=t.text_replace_p,
            )
        text_logits, image_logits = engine(text, image)
        return compute_dalle_loss(
            text_logits,
            image_logits,
            engine.module.internal_text(text),
            image,
            text_weight=t.text_loss_weight,
            image_weight=t.image_loss_weight,
        )

    def tokens_in_batch(self, batch) -> int:
        return int(batch[TEXT_TOKENS].numel() + batch[IMAGE_CODES].numel())

    def flops_per_token(self) -> float:
        return self._flops_per_token or 0.0

    def export_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (gathered from ZeRO-3 partitions), None elsewhere."""
        return export_module_state(engine)
