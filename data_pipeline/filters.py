"""Curation filters: pure per-sample predicates plus the Ray Data stage that applies them.

Each predicate returns "" (keep) or a reason from `columns`; a row keeps the first reason it
gets, so validation verdicts are never overwritten by filters.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass

import numpy as np

from data_pipeline import columns as C

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
       "==": operator.eq, "!=": operator.ne}  # fmt: skip


@dataclass
class FieldFilter:
    """Keep a sample only if its input field passes: `{field: punsafe, op: "<", value: 0.1}`.

    Fields are those the sample brought (its `.json` member and its shard's parquet sidecar:
    img2dataset's width/height/original_width/status..., LAION's similarity, punsafe,
    pwatermark). A number compares numerically (a missing, null, NaN or non-numeric field fails);
    a string value compares with `==`/`!=` only."""

    field: str = ""  # the input field's name
    op: str = ""  # one of < <= > >= == !=
    value: float | str = 0.0  # a number, or a string for == / !=

    def check(self, where: str) -> None:
        """Raise ValueError naming `where` (the config key) for an unusable filter."""
        if not self.field:
            raise ValueError(f"{where}.field: empty (name an input field, e.g. punsafe)")
        if self.op not in OPS:
            raise ValueError(f"{where}.op: {self.op!r} is not one of {' '.join(OPS)}")
        if isinstance(self.value, str) and self.op not in ("==", "!="):
            raise ValueError(f"{where}.value: {self.value!r} is a string; {self.op} needs a number")

    def reason(self, fields: dict) -> tuple[str, str]:
        """("", "") if `fields` pass, else (FIELD_FILTER, detail naming the field and value)."""
        got = fields.get(self.field)
        rule = f"{self.field} {self.op} {self.value}"
        if isinstance(self.value, str):
            ok = isinstance(got, str) and OPS[self.op](got, self.value)
        else:
            number = isinstance(got, int | float) and not isinstance(got, bool)
            ok = number and not math.isnan(got) and OPS[self.op](got, self.value)
        if ok:
            return "", ""
        shown = "missing" if self.field not in fields else json.dumps(got, default=str)[:80]
        return C.FIELD_FILTER, f"{self.field}={shown} fails {rule}"


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
    """Ray Data CPU stage: size, aspect-ratio, caption-length and input-field filters on
    still-valid rows."""

    def __init__(self, min_side: int, max_aspect_ratio: float, min_words: int, max_words: int,
                 fields: list[FieldFilter] | tuple = ()):  # fmt: skip
        self.min_side, self.max_aspect_ratio = min_side, max_aspect_ratio
        self.min_words, self.max_words = min_words, max_words
        self.fields = list(fields)

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
            if not reason and self.fields:
                meta = json.loads(str(batch[C.META][i]) or "{}")
                for f in self.fields:
                    reason, detail = f.reason(meta)
                    if reason:
                        break
            reasons[i], details[i] = reason, detail
        return {**batch, C.REASON: reasons.astype(str), C.DETAIL: details.astype(str)}
