"""The token dataset: what `t2i tokenize` writes and `t2i train` reads (both recipes).

Parquet shards + `manifest.json` written last. Rows: `key` (str), `caption` (str), `text_tokens`
(int32 list, length text_len, padded with `text_pad_id`), `image_codes` (int16/int32 list, the
row-major grid). The manifest carries the schema version, row counts, sha256 per shard, the vocab
sizes, text length and grid side; the trainer refuses a dataset whose shapes disagree with its
model config, or a version it does not know.

The latent dataset (recipe=ldm, version 2) has `latent` (float16 list, C*H*W, already multiplied
by the KL-AE's scaling factor) and `text_embedding` (float16 list, L*D per-token text states)
instead of `image_codes`; `text_tokens` give the text mask (ids != text_pad_id). With
`text: tokens` in the manifest the rows carry no `text_embedding`: the trainer encodes the ids. The text
encoder's states for the empty caption — the unconditional branch of classifier-free guidance —
are stored once in `empty_caption.safetensors`, named with its sha256 in the manifest.

Also here: synthetic sources with the same columns, for tests and benchmarks.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from data_pipeline import fs
from data_pipeline.columns import (  # the on-disk columns, named in the one vocabulary
    IMAGE_CODES,
    LATENT,
    LATENT_FLIP,
    LATENT_H,
    LATENT_W,
    SAMPLE_ID,
    TEXT_EMBEDDING,
    TEXT_MASK,
    TEXT_TOKENS,
)
from data_pipeline.config import StorageConfig
from data_pipeline.manifest import MANIFEST_NAME, read_manifest

FORMAT = "ray-t2i/tokens"
VERSION = 1
LATENT_FORMAT = "ray-t2i/latents"  # the latent-diffusion recipe's dataset
LATENT_VERSION = 2  # 2: text mask from text_tokens + empty_caption.safetensors
KNOWN_FORMATS = {FORMAT: (VERSION,), LATENT_FORMAT: (LATENT_VERSION,)}

EMPTY_CAPTION_FILE = "empty_caption.safetensors"  # {text_embedding (L, D) f16, text_mask (L,) u8}


def read_token_dataset(uri: str, *, storage: StorageConfig | None = None):
    """(ray.data.Dataset of text_tokens/image_codes as 2-D arrays, manifest) for a token dataset;
    `storage` (the job's config section) sets the S3 endpoint, region, retries and timeouts."""
    import ray.data

    base = fs.resolve(uri, storage=storage)
    manifest = read_manifest(base, FORMAT, (VERSION,))
    paths = [base.join(s["path"]).path for s in manifest["shards"]]
    ds = ray.data.read_parquet(paths, filesystem=base.fs, columns=[TEXT_TOKENS, IMAGE_CODES])
    return ds.map_batches(_lists_to_arrays, batch_format="numpy"), manifest


def read_latent_dataset(uri: str, *, storage: StorageConfig | None = None, flips: bool = False):
    """(ray.data.Dataset of `latent` (B, C, H, W) and `text_embedding` (B, L, D) float32 arrays
    and `text_mask` (B, L) bool, manifest) for a latent dataset (`t2i tokenize` recipe=ldm).
    A `text: tokens` dataset gives `text_tokens` (B, L) int64 in place of `text_embedding`.
    `flips`: also `latent_flip` (the mirrored image's latent; the dataset must hold it).
    A bucketed dataset (`buckets` in the manifest) gives `latent` (and `latent_flip`) as
    (B, C*H*W) with the square's C*H*W zero-padded (row i holds its C*h*w first) and
    `latent_h`, `latent_w` (B,) int64: the trainer regroups rows by grid (`bucket_grids`)."""
    import ray.data

    base = fs.resolve(uri, storage=storage)
    manifest = read_latent_manifest(base)
    if flips and not manifest.get("flip"):
        raise ValueError(
            f"{base.uri}: this latent dataset holds no mirrored latents; re-run `t2i tokenize` "
            f"with flip=true"
        )
    shapes = {}
    for col, key in ((LATENT, "latent_shape"), (TEXT_EMBEDDING, "text_embedding_shape")):
        shape = manifest.get(key)
        if not (isinstance(shape, list) and shape and all(isinstance(n, int) for n in shape)):
            raise ValueError(
                f"{base.uri}/manifest.json: {key} must be a list of ints, got {shape!r}"
            )
        shapes[col] = tuple(shape)
    paths = [base.join(s["path"]).path for s in manifest["shards"]]
    stored = latent_text(manifest)
    if stored == "tokens":  # the rows hold ids only: the trainer's frozen encoder makes states
        del shapes[TEXT_EMBEDDING]
    if flips:
        shapes[LATENT_FLIP] = shapes[LATENT]
    grids = bool(manifest.get("buckets"))
    columns = [*shapes, TEXT_TOKENS, *([LATENT_H, LATENT_W] if grids else [])]
    ds = ray.data.read_parquet(paths, filesystem=base.fs, columns=columns)
    pad = int(manifest["text_pad_id"])
    arrays = _LatentArrays(shapes, pad, ids=stored == "tokens", grids=grids)
    return ds.map_batches(arrays, batch_format="numpy"), manifest


def latent_text(manifest: dict[str, Any]) -> str:
    """What a latent dataset's rows carry for the caption (`t2i tokenize` key `text`): "states"
    (`text_embedding`, the text encoder's output) or "tokens" (`text_tokens` only)."""
    text = manifest.get("text", "states")  # datasets written before the key: states
    if text not in ("states", "tokens"):
        raise ValueError(f"latent dataset manifest: text={text!r}; expected states or tokens")
    return text


def read_latent_manifest(base: fs.Location) -> dict[str, Any]:
    """The manifest of a latent dataset; version 1 (no empty-caption states) is refused."""
    from data_pipeline.manifest import ManifestError

    try:
        return read_manifest(base, LATENT_FORMAT, (LATENT_VERSION,))
    except ManifestError as e:
        if "version" in str(e):
            raise ManifestError(
                f"{e}; latent datasets before version {LATENT_VERSION} lack the empty-caption "
                f"states that classifier-free guidance needs: re-run `t2i tokenize` into a new "
                f"output"
            ) from None
        raise


def read_empty_caption(base: fs.Location, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The unconditional text states of a latent dataset: `text_embedding` (L, D) float32 and
    `text_mask` (L,) bool, checked against the manifest's sha256 and shapes."""
    import hashlib

    from safetensors.numpy import load

    entry = manifest.get("empty_caption") or {}
    loc = base.join(entry.get("file", EMPTY_CAPTION_FILE))
    data = fs.read_bytes(loc)
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ValueError(f"{loc.uri}: sha256 does not match the manifest's empty_caption.sha256")
    arrays = load(data)
    emb = arrays[TEXT_EMBEDDING].astype(np.float32)
    if list(emb.shape) != list(manifest["text_embedding_shape"]):
        raise ValueError(
            f"{loc.uri}: text_embedding shape {list(emb.shape)} but the manifest says "
            f"{manifest['text_embedding_shape']}"
        )
    return {TEXT_EMBEDDING: emb, TEXT_MASK: arrays[TEXT_MASK].astype(bool)}


def empty_caption_bytes(embedding: np.ndarray, mask: np.ndarray) -> bytes:
    """`empty_caption.safetensors` content: (L, D) float16 states and (L,) uint8 mask."""
    from safetensors.numpy import save

    return save(
        {
            TEXT_EMBEDDING: np.ascontiguousarray(embedding, dtype=np.float16),
            TEXT_MASK: np.ascontiguousarray(mask, dtype=np.uint8),
        }
    )


class _LatentArrays:
    """Flattened fp16 list columns -> (B, *shape) float32 arrays (fp16 on disk halves the I/O),
    and the text mask from the token ids."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], pad_id: int, ids: bool = False,
                 grids: bool = False):  # fmt: skip
        self.shapes, self.pad_id, self.ids, self.grids = shapes, pad_id, ids, grids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for k, shape in self.shapes.items():
            if self.grids and k in (LATENT, LATENT_FLIP):  # ragged rows -> zero-padded (B, N)
                rows = batch[k]
                padded = np.zeros((len(rows), int(np.prod(shape))), np.float32)
                for i, row in enumerate(rows):
                    padded[i, : len(row)] = row
                out[k] = padded
            else:
                out[k] = np.stack(batch[k]).astype(np.float32).reshape(-1, *shape)
        if self.grids:
            out[LATENT_H] = np.asarray(batch[LATENT_H], np.int64)
            out[LATENT_W] = np.asarray(batch[LATENT_W], np.int64)
        tokens = np.stack(batch[TEXT_TOKENS])  # (B, L)
        out[TEXT_MASK] = tokens != self.pad_id
        if self.ids:  # text: tokens
            out[TEXT_TOKENS] = tokens.astype(np.int64)
        return out


def check_latent_compatible(
    manifest: dict[str, Any],
    *,
    latent_shape: tuple[int, ...] | list[int],
    text_width: int,
    scaling_factor: float = 0.0,
    source: str = "dataset",
) -> None:
    """Raise ValueError naming the first field where a latent dataset and the model disagree:
    the latent shape (unet.in_channels/sample_size), the text-state width
    (unet.cross_attention_dim) and, when the model asks for one, the latent scaling factor."""
    got = manifest.get("latent_shape")
    if got != list(latent_shape):
        raise ValueError(
            f"{source}: manifest latent_shape={got!r} but the model config needs "
            f"{list(latent_shape)} (unet.in_channels, unet.sample_size x2): set them to match "
            f"the dataset, or re-tokenize"
        )
    text = manifest.get("text_embedding_shape") or [None, None]
    if text[-1] != text_width:
        raise ValueError(
            f"{source}: manifest text_embedding_shape={text!r} (width {text[-1]}) but "
            f"unet.cross_attention_dim={text_width}: set it to the text encoder's width"
        )
    scale = manifest.get("scaling_factor")
    if not isinstance(scale, int | float) or scale <= 0:
        raise ValueError(f"{source}: manifest scaling_factor={scale!r} is not a positive number")
    if scaling_factor and abs(scaling_factor - scale) > 1e-6 * scale:
        raise ValueError(
            f"{source}: manifest scaling_factor={scale} (the dataset's KL-AE) but "
            f"ldm.scaling_factor={scaling_factor}: the latents were scaled differently"
        )


def read_any_manifest(base: fs.Location) -> dict[str, Any]:
    """The manifest of a token or latent dataset (either format, known versions only)."""
    loc = base.join(MANIFEST_NAME)
    fmt = None
    if fs.exists(loc):
        try:
            fmt = json.loads(fs.read_bytes(loc)).get("format")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            fmt = None  # read_manifest below names the problem
    fmt = fmt if fmt in KNOWN_FORMATS else FORMAT
    return read_manifest(base, fmt, KNOWN_FORMATS[fmt])


def _lists_to_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Parquet list columns arrive as object arrays of 1-D arrays: stack to (B, L) int64 for torch.
    return {k: np.stack(batch[k]).astype(np.int64) for k in (TEXT_TOKENS, IMAGE_CODES)}


def check_compatible(
    manifest: dict[str, Any],
    *,
    text_vocab: int,
    text_len: int,
    image_vocab: int,
    image_grid: int,
    source: str = "dataset",
) -> None:
    """Raise ValueError naming the first field where the dataset and the model disagree."""
    expected = {
        "text_vocab": text_vocab,
        "text_len": text_len,
        "image_vocab": image_vocab,
        "image_grid": image_grid,
    }
    for key, want in expected.items():
        got = manifest.get(key)
        if got != want:
            raise ValueError(
                f"{source}: manifest {key}={got!r} but the model config has {key}={want} "
                f"(set dalle.{key} to match the dataset, or re-tokenize)"
            )


class SyntheticTokens:
    """Deterministic, learnable token rows from row ids: the caption names a class, the image is
    that class's code pattern with a little noise — so the loss can fall well below chance."""

    def __init__(
        self,
        *,
        text_len: int,
        text_vocab: int,
        image_grid: int,
        image_vocab: int,
        seed: int = 0,
        classes: int = 10,
    ):
        self.text_len, self.text_vocab = text_len, text_vocab
        self.n_image = image_grid * image_grid
        self.image_vocab, self.seed, self.classes = image_vocab, seed, classes
        rng = np.random.default_rng([seed, 7])
        self.patterns = rng.integers(0, image_vocab, size=(classes, self.n_image))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        text = np.zeros((len(ids), self.text_len), dtype=np.int64)  # 0 = pad
        image = np.empty((len(ids), self.n_image), dtype=np.int64)
        for j, i in enumerate(ids):
            rng = np.random.default_rng([self.seed, int(i)])
            c = int(rng.integers(self.classes))
            n_words = int(rng.integers(1, self.text_len + 1))
            text[j, :n_words] = 1 + (c * 3 + np.arange(n_words)) % (self.text_vocab - 1)
            noise = rng.random(self.n_image) < 0.1
            image[j] = np.where(
                noise, rng.integers(0, self.image_vocab, self.n_image), self.patterns[c]
            )
        return {TEXT_TOKENS: text, IMAGE_CODES: image, SAMPLE_ID: np.asarray(ids, dtype=np.int64)}


def synthetic_token_dataset(rows: int, **kwargs):
    """A Ray Dataset of `rows` synthetic rows (same columns as `read_token_dataset`)."""
    import ray.data

    blocks = max(1, min(16, rows // 64))
    return ray.data.range(rows, override_num_blocks=blocks).map_batches(
        SyntheticTokens(**kwargs), batch_format="numpy"
    )


class SyntheticLatents:
    """Deterministic, learnable latent rows from row ids: class c's latent is a fixed pattern plus
    a little noise, its text states a fixed per-class sequence of `1 + c % text_len` tokens."""

    def __init__(self, *, latent_shape, text_shape, seed: int = 0, classes: int = 10):
        self.latent_shape, self.text_shape = tuple(latent_shape), tuple(text_shape)
        self.seed, self.classes = seed, classes
        rng = np.random.default_rng([seed, 11])
        self.patterns = rng.standard_normal((classes, *self.latent_shape)).astype(np.float32)
        self.states = rng.standard_normal((classes, *self.text_shape)).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        n, (length, _) = len(ids), self.text_shape
        latent = np.empty((n, *self.latent_shape), np.float32)
        text = np.empty((n, *self.text_shape), np.float32)
        mask = np.zeros((n, length), bool)
        for j, i in enumerate(ids):
            rng = np.random.default_rng([self.seed, int(i)])
            c = int(rng.integers(self.classes))
            noise = 0.1 * rng.standard_normal(self.latent_shape).astype(np.float32)
            latent[j] = self.patterns[c] + noise
            text[j] = self.states[c]
            mask[j, : 1 + c % length] = True
        return {LATENT: latent, TEXT_EMBEDDING: text, TEXT_MASK: mask}

    def empty_caption(self) -> dict[str, np.ndarray]:
        mask = np.zeros(self.text_shape[0], bool)
        mask[0] = True
        return {TEXT_EMBEDDING: np.zeros(self.text_shape, np.float32), TEXT_MASK: mask}


def synthetic_latent_dataset(rows: int, **kwargs):
    """A Ray Dataset of `rows` synthetic latent rows (same columns as `read_latent_dataset`)."""
    import ray.data

    blocks = max(1, min(16, rows // 64))
    return ray.data.range(rows, override_num_blocks=blocks).map_batches(
        SyntheticLatents(**kwargs), batch_format="numpy"
    )
