"""The one column vocabulary of every job, and the quarantine reasons of the preprocess plan.

Every Ray Data stage of `t2i preprocess` and `t2i tokenize`, the token datasets they write and the
training datasets read from shards use these names; a name means one thing everywhere (`IMAGE`
is always encoded bytes, `PIXELS` always a decoded uint8 array). The quarantine table and
`stats.json` use the reason strings below verbatim (a contract with users who query them).
"""

from __future__ import annotations

# --- identity of a sample: which input shard, which position in it --------------------------------
SHARD_IDX = "shard_idx"  # int64: index of the source shard in the sorted input list
SOURCE_SHARD = "source_shard"  # str: the source shard's URI (local path or s3://...)
SEQ = "seq"  # int64: ordinal of the sample (or damage record) within its shard, from 0
KEY = "key"  # str: the WebDataset key
SHARD_ROWS = "shard_rows"  # int64: rows the reader produced for this shard (resume bookkeeping)

# --- payload (only between the reader and the decode stage) ---------------------------------------
IMAGE = "image"  # bytes: encoded image member
IMAGE_EXT = "image_ext"  # str: its extension (jpg, png, ...)
CAPTION = "caption"  # str: decoded UTF-8 caption
# str: the sample's input fields as a JSON object: its shard's parquet sidecar row (img2dataset's
# `NNNNN.parquet`) overlaid with its own `.json` member; "{}" when it has neither. Kept verbatim
# in the clean shard's `.json` and sidecar, beside the fields preprocessing adds.
META = "meta"

# --- token datasets (`t2i tokenize` output, on disk; read by training) ------------------------------
TEXT_TOKENS = "text_tokens"  # int list: BPE ids of the caption, padded
IMAGE_CODES = "image_codes"  # int list: the image tokenizer's codes, raster order
LATENT = "latent"  # float16 list: C*H*W, shape in manifest["latent_shape"]
TEXT_EMBEDDING = "text_embedding"  # float16 list: L*D, shape in manifest["text_embedding_shape"]
TEXT_MASK = "text_mask"  # reader output only: (B, L) bool, True where a token is not padding
# recipe=ldm `flip: true`: the latent of the horizontally mirrored image (same shape as `latent`)
LATENT_FLIP = "latent_flip"
# recipe=ldm `buckets: true`: the row's latent grid (its aspect-ratio bucket); `latent` holds C*h*w
LATENT_H = "latent_h"  # int32
LATENT_W = "latent_w"  # int32
SAMPLE_ID = "id"  # synthetic rows only: the row's id (drills log which samples were consumed)

# --- verdict --------------------------------------------------------------------------------------
REASON = "reason"  # str: "" for a sample still in, else one of the reasons below
DETAIL = "detail"  # str: human-readable detail (member name, sizes, error text)

# --- decoded facts and scores ---------------------------------------------------------------------
WIDTH = "width"  # int64: decoded image width (0 when not decoded)
HEIGHT = "height"  # int64
PIXEL_HASH = "pixel_hash"  # str: sha256 of the decoded RGB pixels and their shape ("" if none)
PIXELS = "pixels"  # uint8 (S, S, 3): resized, centre-cropped image for CLIP (zeros if invalid)
# tokenize `buckets: true`: PIXELS is (S*S*3,) flat, the bucket's H*W*3 first, zero-padded
BUCKET = "bucket"  # int32: index of the row's aspect-ratio bucket (tokenize, in flight only)
LATENT_LEN = "latent_len"  # int64: C*h*w of the row's bucket (tokenize, in flight only)
CLIP_SCORE = "clip_score"  # float32: cosine(image, text); NaN when not scored
EMBEDDING = "embedding"  # float32 (D,): L2-normalised CLIP image embedding (zeros if not scored)

# --- dedup ----------------------------------------------------------------------------------------
BUCKET = "bucket"  # str: "<band>:<hash bits>" LSH bucket id (near-dup stage only)
IS_MARK = "is_mark"  # bool: row is a dedup verdict, not a scored sample (clean-writer input)

# Quarantine reasons. Validation reasons mean the input is broken or hostile; they count towards
# `max_bad_fraction`. Filter and dedup reasons are ordinary curation and do not.
CORRUPT_TAR = "corrupt_tar"  # the tar stream is damaged here; samples before it are kept
NOT_A_FILE = "not_a_file"  # symlink, hard link, device, fifo: never followed
INVALID_KEY = "invalid_key"  # key with dots, "..", absolute path or odd characters
MEMBER_TOO_LARGE = "member_too_large"  # one member over `validate.max_member_bytes`
UNSAFE_MEMBER = "unsafe_member"  # pickle-capable member (.pkl, .pt, object .npy...): never loaded
NONCONTIGUOUS_KEY = "noncontiguous_key"  # one key's members interleaved with another key's
DUPLICATE_KEY = "duplicate_key"  # a key seen again after its sample completed (first one kept)
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"  # empty or whitespace only
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_LONG = "caption_too_long"  # over `validate.max_caption_bytes`
UNDECODABLE_IMAGE = "undecodable_image"
DECOMPRESSION_BOMB = "decompression_bomb"  # header declares more than `validate.max_pixels`
INVALID_JSON = "invalid_json"  # a `.json` member that is not a UTF-8 JSON object

VALIDATION_REASONS = (
    CORRUPT_TAR,
    NOT_A_FILE,
    INVALID_KEY,
    MEMBER_TOO_LARGE,
    UNSAFE_MEMBER,
    NONCONTIGUOUS_KEY,
    DUPLICATE_KEY,
    MISSING_IMAGE,
    MISSING_CAPTION,
    EMPTY_CAPTION,
    CAPTION_NOT_UTF8,
    CAPTION_TOO_LONG,
    UNDECODABLE_IMAGE,
    DECOMPRESSION_BOMB,
    INVALID_JSON,
)

TOO_SMALL = "too_small"  # short side under `filters.min_side`
BAD_ASPECT_RATIO = "bad_aspect_ratio"  # long/short side over `filters.max_aspect_ratio`
CAPTION_LENGTH = "caption_length"  # word count outside [min_caption_words, max_caption_words]
LOW_CLIP_SCORE = "low_clip_score"  # cosine(image, text) under `clip.threshold`
FIELD_FILTER = "field_filter"  # an input field (punsafe, similarity...) fails `filters.fields`
FILTER_REASONS = (TOO_SMALL, BAD_ASPECT_RATIO, CAPTION_LENGTH, FIELD_FILTER, LOW_CLIP_SCORE)

DUPLICATE_EXACT = "duplicate_exact"  # same decoded pixels as a sample with a smaller key
DUPLICATE_NEAR = "duplicate_near"  # CLIP image cosine >= dedup.near_threshold to a kept sample
DEDUP_REASONS = (DUPLICATE_EXACT, DUPLICATE_NEAR)

ALL_REASONS = VALIDATION_REASONS + FILTER_REASONS + DEDUP_REASONS

# Which stage each reason belongs to, for the per-stage counts in stats.json.
STAGE_OF_REASON = {
    **{r: "validate" for r in VALIDATION_REASONS},
    **{r: "filter" for r in (TOO_SMALL, BAD_ASPECT_RATIO, CAPTION_LENGTH, FIELD_FILTER)},
    LOW_CLIP_SCORE: "clip",
    **{r: "dedup" for r in DEDUP_REASONS},
}
STAGES = ("validate", "filter", "clip", "dedup")
