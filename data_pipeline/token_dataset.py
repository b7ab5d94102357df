"""The token dataset: what `t2i tokenize` writes and `t2i train` reads (autoregressive recipe).

Parquet shards + `manifest.json` written last. Rows: `key` (str), `caption` (str), `text_tokens`
(int32 list, length text_len, padded with `text_pad_id`), `image_codes` (int16/int32 list, the
row-major grid). The manifest carries the schema version, row counts, sha256 per shard, the vocab
sizes, text length and grid side; the trainer refuses a dataset whose shapes disagree with its
model config, or a version it does not know.

Also here: a synthetic source with the same columns, for tests and benchmarks.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from data_pipeline import fs
from data_pipeline.manifest import MANIFEST_NAME, read_manifest

FORMAT = "ray-t2i/tokens"
VERSION = 1
LATENT_FORMAT = "ray-t2i/latents"  # the latent-diffusion recipe's dataset
LATENT_VERSION = 1
KNOWN_FORMATS = {FORMAT: (VERSION,), LATENT_FORMAT: (LATENT_VERSION,)}

KEY = "key"
CAPTION = "caption"
TEXT_TOKENS = "text_tokens"
IMAGE_CODES = "image_codes"
LATENT = "latent"  # float16 list: C*H*W, shape in manifest["latent_shape"]
TEXT_EMBEDDING = "text_embedding"  # float16 list: L*D, shape in manifest["text_embedding_shape"]


def read_token_dataset(uri: str, *, endpoint_url: str | None = None, region: str | None = None):
    """(ray.data.Dataset of text_tokens/image_codes as 2-D arrays, manifest) for a token dataset."""
    import ray.data

    base = fs.resolve(uri, endpoint_url=endpoint_url, region=region)
    manifest = read_manifest(base, FORMAT, (VERSION,))
    paths = [base.join(s["path"]).path for s in manifest["shards"]]
    ds = ray.data.read_parquet(paths, filesystem=base.fs, columns=[TEXT_TOKENS, IMAGE_CODES])
    return ds.map_batches(_lists_to_arrays, batch_format="numpy"), manifest


def read_latent_dataset(uri: str, *, endpoint_url: str | None = None, region: str | None = None):
    """(ray.data.Dataset of `latent` (B, C, H, W) and `text_embedding` (B, L, D) float32 arrays,
    manifest) for a latent dataset written by `t2i tokenize` with recipe=ldm."""
    import ray.data

    base = fs.resolve(uri, endpoint_url=endpoint_url, region=region)
    manifest = read_manifest(base, LATENT_FORMAT, (LATENT_VERSION,))
    shapes = {}
    for col, key in ((LATENT, "latent_shape"), (TEXT_EMBEDDING, "text_embedding_shape")):
        shape = manifest.get(key)
        if not (isinstance(shape, list) and shape and all(isinstance(n, int) for n in shape)):
            raise ValueError(
                f"{base.uri}/manifest.json: {key} must be a list of ints, got {shape!r}"
            )
        shapes[col] = tuple(shape)
    paths = [base.join(s["path"]).path for s in manifest["shards"]]
    ds = ray.data.read_parquet(paths, filesystem=base.fs, columns=[LATENT, TEXT_EMBEDDING])
    return ds.map_batches(_LatentArrays(shapes), batch_format="numpy"), manifest


class _LatentArrays:
    """Flattened fp16 list columns -> (B, *shape) float32 arrays (fp16 on disk halves the I/O)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: np.stack(batch[k]).astype(np.float32).reshape(-1, *shape)
            for k, shape in self.shapes.items()
        }


def check_latent_compatible(
    manifest: dict[str, Any],
    *,
    latent_shape: tuple[int, ...] | list[int],
    text_embedding_shape: tuple[int, ...] | list[int],
    source: str = "dataset",
) -> None:
    """Raise ValueError naming the first field where a latent dataset and the model disagree."""
    expected = {
        "latent_shape": list(latent_shape),
        "text_embedding_shape": list(text_embedding_shape),
    }
    for key, want in expected.items():
        got = manifest.get(key)
        if got != want:
            raise ValueError(
                f"{source}: manifest {key}={got!r} but the model config needs {want} "
                f"(change the model config to match the dataset, or re-tokenize)"
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
        return {TEXT_TOKENS: text, IMAGE_CODES: image}


def synthetic_token_dataset(rows: int, **kwargs):
    """A Ray Dataset of `rows` synthetic rows (same columns as `read_token_dataset`)."""
    import ray.data

    blocks = max(1, min(16, rows // 64))
    return ray.data.range(rows, override_num_blocks=blocks).map_batches(
        SyntheticTokens(**kwargs), batch_format="numpy"
    )
