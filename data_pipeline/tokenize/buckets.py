"""Aspect-ratio buckets for the latent recipe (`t2i tokenize` recipe=ldm `buckets: true`), as
NovelAI's, kohya's sd-scripts and mosaicml/diffusion bucket their training images.

    buckets  : every (H, W) with both sides multiples of `step`, H * W <= image_size**2, the
               longer side at most `max_ratio` times the shorter, and no room to grow: for
               each width W the tallest H that fits (and each transpose), plus the square
    an image : goes to the bucket nearest its aspect ratio, |log(W/H) - log(w/h)| (ties: the
               larger bucket, then the wider), is resized to cover it and centre-cropped to it

Every bucket holds at most the square's pixels, so a bucket's latent fits in the square's
(C, S/f, S/f) buffer: the trainer's batches keep one fixed width and regroup by shape.
"""

from __future__ import annotations

import math


def compute_buckets(image_size: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """The (H, W) buckets of `image_size`, sorted by aspect ratio W / H (then area)."""
    if step < 1 or image_size % step:
        raise ValueError(f"bucket_step={step} must be >= 1 and divide image_size={image_size}")
    if max_ratio < 1:
        raise ValueError(f"bucket_max_ratio must be >= 1, got {max_ratio}")
    area = image_size * image_size
    found = {(image_size, image_size)}
    width = step
    while width * step <= area:
        height = (area // width) // step * step  # the tallest multiple of step that fits
        if height >= step and max(height, width) <= max_ratio * min(height, width):
            found |= {(height, width), (width, height)}
        width += step
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[0] * hw[1]))


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket nearest the aspect ratio of a `width` x `height` image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ar = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (
            abs(math.log(buckets[i][1] / buckets[i][0]) - ar),
            -buckets[i][0] * buckets[i][1],
            -buckets[i][1],
        ),
    )
