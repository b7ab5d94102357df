"""Curation filters: pure per-sample predicates plus the Ray Data stage that applies them.

Each predicate returns "" (keep) or a reason from `columns`; a row keeps the first reason it
gets, so validation verdicts are never overwritten by filters.
"""

from __future__ import annotations

import numpy as np

from data_pipeline import columns as C


def size_reason(width: int, height: int, min_side: int, max_aspect_ratio: float) -> tuple[str, str]:
    """Too small or too elongated; 0 disables either check."""
    short, long = min(width, height), max(width, height)
    if min_side and short < min_side:
        return C.TOO_SMALL, f"{width}x{height}: short side < {min_side}"
    if max_aspect_ratio and long > max_aspect_ratio * short:
        return (
            C.BAD_ASPECT_RATIO,
            f"{width}x{height}: aspect {long / short:.2f} > {max_aspect_ratio}",
        )
    return "", ""


def caption_reason(caption: str, min_words: int, max_words: int) -> tuple[str, str]:
    """Word count outside [min_words, max_words]; 0 disables either bound."""
    words = len(caption.split())
    if (min_words and words < min_words) or (max_words and words > max_words):
        return C.CAPTION_LENGTH, f"{words} words not in [{min_words or 0}, {max_words or 'inf'}]"
    return "", ""


def clip_reason(score: float, threshold: float) -> tuple[str, str]:
    """Below the CLIP cosine threshold (NaN scores are never filtered here)."""
    if score < threshold:
        return C.LOW_CLIP_SCORE, f"cosine {score:.4f} < {threshold}"
    return "", ""


class ApplyFilters:
    """Ray Data CPU stage: size, aspect-ratio and caption-length filters on still-valid rows."""

    def __init__(self, min_side: int, max_aspect_ratio: float, min_words: int, max_words: int):
        self.min_side, self.max_aspect_ratio = min_side, max_aspect_ratio
        self.min_words, self.max_words = min_words, max_words

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reasons = batch[C.REASON].astype(object)
        details = batch[C.DETAIL].astype(object)
        for i in range(len(reasons)):
            if reasons[i]:
                continue
            reason, detail = size_reason(
                int(batch[C.WIDTH][i]), int(batch[C.HEIGHT][i]), self.min_side,
                self.max_aspect_ratio,
            )  # fmt: skip
            if not reason:
                reason, detail = caption_reason(
                    str(batch[C.CAPTION][i]), self.min_words, self.max_words
                )
            reasons[i], details[i] = reason, detail
        return {**batch, C.REASON: reasons.astype(str), C.DETAIL: details.astype(str)}
