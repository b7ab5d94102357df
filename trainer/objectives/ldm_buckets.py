"""Aspect-ratio buckets in training (a latent dataset tokenized with `buckets: true`).

Ray Data's `iter_torch_batches` mixes rows of every bucket, and a U-Net batch must hold one
latent shape. Each rank therefore regroups its own row stream:

    mixed batches (B rows, latents zero-padded to the square's C*S*S, `latent_h`, `latent_w`)
      -> one buffer per grid (h, w), filled in stream order
      -> a batch of B rows (C, h, w) the moment a buffer is full
      -> stop after `steps` batches: the same number on every rank

`steps` is fixed in advance (pigeonhole): a rank's epoch holds N rows (Ray Train's equal split:
total // world; `drop_last` keeps N' = N - N % B), and at most B - 1 rows stay behind in each of
the K buckets, so every rank emits at least ceil((N' - K (B - 1)) / B) batches. No collective per
step, no rank waiting on another, and the regrouping is a pure function of the seeded row order:
a resumed run that skips `batches_in_epoch` regrouped batches is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from data_pipeline import token_dataset as T


def compute_bucket_steps(rows: int, world: int, batch_size: int, buckets: int) -> int:
    """Batches every rank can emit per epoch: `rows` in the dataset, `buckets` non-empty ones."""
    per_rank = rows // world
    fed = per_rank - per_rank % batch_size  # iter_torch_batches(drop_last=True)
    left_behind = buckets * (batch_size - 1)  # at most B - 1 rows stay in each buffer
    return max(0, -(-(fed - left_behind) // batch_size))


def regroup_buckets(
    batches: Iterable[dict[str, torch.Tensor]], batch_size: int, steps: int, channels: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One-grid batches of `batch_size` rows from mixed ones, in stream order, `steps` of them;
    `latent` (and `latent_flip`) become (B, channels, h, w). Raises if the stream ends first
    (the other ranks would wait for this one in their next collective)."""
    buffers: dict[tuple[int, int], list[dict[str, torch.Tensor]]] = {}
    emitted = 0
    if steps <= 0:
        return
    for batch in batches:
        grids = zip(batch[T.LATENT_H].tolist(), batch[T.LATENT_W].tolist(), strict=True)
        for i, (h, w) in enumerate(grids):
            buf = buffers.setdefault((h, w), [])
            buf.append({k: v[i] for k, v in batch.items()})
            if len(buf) < batch_size:
                continue
            yield _collate(buf, channels, h, w)
            buffers[(h, w)] = []
            emitted += 1
            if emitted == steps:
                return
    raise RuntimeError(
        f"bucketed latent dataset: the row stream ended after {emitted} of the {steps} batches "
        f"every rank takes per epoch (the dataset changed, or the split was not equal)"
    )


def _collate(rows: list[dict[str, torch.Tensor]], channels: int, h: int, w: int) -> dict:
    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    n = channels * h * w
    for k in (T.LATENT, T.LATENT_FLIP):
        if k in out:  # (B, C*S*S) zero-padded -> (B, C, h, w)
            out[k] = out[k][:, :n].reshape(len(rows), channels, h, w)
    return out
