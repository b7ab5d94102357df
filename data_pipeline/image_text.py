"""Image-text pairs straight from WebDataset shards, for stage-1 training (CLIP, image tokenizers).

Shards are listed and parsed by the hostile-input reader of `t2i preprocess` (per-sample
validation, nothing unpickled); rows it flags are dropped here — curating data is preprocess's job,
and its quarantine table is where bad samples are accounted for. Images are decoded with a pixel
limit, converted to RGB and resized to a square; an image that fails to decode is dropped too.
The order is deterministic (one task per shard, rows in shard order), which exact resume needs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_pipeline import columns as C
from data_pipeline.config import StorageConfig
from data_pipeline.webdataset_source import ReaderLimits, list_shards, read_shard_rows

# Rows: C.PIXELS uint8 (S, S, 3), C.CAPTION str (data_pipeline/columns.py, the one vocabulary)


def _read_shard(
    item: dict, *, storage: StorageConfig | None, size: int, max_pixels: int
) -> list[dict]:
    limits = ReaderLimits.of()  # the preprocess defaults: same per-sample rules
    rows = read_shard_rows(item["uri"], limits, storage=storage, sidecar=False)
    out = []
    for r in rows:
        if r[C.REASON] or not r[C.IMAGE]:
            continue
        img = decode_square(r[C.IMAGE], size, max_pixels)
        if img is not None:
            out.append({C.PIXELS: img, C.CAPTION: r[C.CAPTION]})
    return out


def decode_square(data: bytes, size: int, max_pixels: int) -> np.ndarray | None:
    """Encoded image -> (size, size, 3) uint8, or None if it does not decode or is too large."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                return None
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def image_text_dataset(
    inputs: str | list[str],
    *,
    size: int,
    storage: StorageConfig | None = None,
    max_pixels: int = 4_000_000,
):
    """A Ray Dataset of {pixels: (S, S, 3) uint8, caption: str} rows from the shards in `inputs`;
    `storage` (the job's config section) sets the S3 endpoint, region, retries and timeouts."""
    import ray.data

    uris = list_shards(inputs, storage=storage)
    return ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris)).flat_map(
        _read_shard,
        fn_kwargs=dict(storage=storage, size=size, max_pixels=max_pixels),
    )
