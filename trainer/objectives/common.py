"""What several objectives share: reading their training images from image-text shards."""

from __future__ import annotations

from data_pipeline.columns import PIXELS
from data_pipeline.image_text import image_text_dataset
from trainer.config import TrainConfig


def shard_dataset(
    cfg: TrainConfig,
    objective: str,
    *,
    size: int,
    what: str = "image-text shards",
    hint: str = "",
    images_only: bool = False,
):
    """The Ray dataset of the image-text shards at `cfg.data.path` (images resized to `size`),
    with only the image column if `images_only` (captions unused; strings do not batch).

    Raises ValueError naming `objective` unless `data.source=shards` with a `data.path`; `what`
    names the data it trains on and `hint` (e.g. " (e.g. ...)") ends the message."""
    d = cfg.data
    if d.source != "shards" or not d.path:
        raise ValueError(
            f"objective={objective} trains on {what}: set data.source=shards and data.path to "
            f"a shards dir, glob or s3:// prefix{hint}"
        )
    ds = image_text_dataset(
        d.path,
        size=size,
        storage=cfg.storage,
    )
    return ds.select_columns([PIXELS]) if images_only else ds
