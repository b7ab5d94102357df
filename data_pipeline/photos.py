"""A benchmark data set in img2dataset's layout, built from real photos that ship with
scikit-image (no downloads): random crops with aspect and scale jitter, resized so the long side
lies in [min_side, max_side] (256-768 px by default), saved as JPEG at a random quality, captioned
from a template per source photo.

    out/00000.tar         <key>.jpg  <key>.txt  <key>.json   (img2dataset's members)
    out/00000.parquet     one row per sample, the .json fields   (img2dataset's sidecar)
    out/00000_stats.json  count, successes                       (img2dataset's)

The `.json` fields are img2dataset's (url, caption, key, status, error_message, width, height,
original_width, original_height, exif, sha256) plus LAION's (similarity, punsafe, pwatermark),
the latter drawn at random: filters on them behave as on LAION. Deterministic per seed.

    python -m data_pipeline.photos --out /tmp/photos --samples 2000
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data_pipeline import fs
from data_pipeline.config import StorageConfig
from data_pipeline.shards import write_shard

# (scikit-image sample, caption subject); all ship with the package.
SOURCES = (
    ("astronaut", "an astronaut in a spacesuit"),
    ("coffee", "a cup of coffee on a saucer"),
    ("chelsea", "a tabby cat"),
    ("rocket", "a rocket on a launch pad"),
    ("camera", "a cameraman with a tripod"),
    ("coins", "a collection of old coins"),
    ("immunohistochemistry", "stained tissue under a microscope"),
    ("hubble_deep_field", "distant galaxies in deep space"),
    ("retina", "the retina of a human eye"),
    ("moon", "the surface of the moon"),
    ("page", "a page of printed text"),
    ("brick", "a brick wall"),
    ("grass", "a patch of green grass"),
)
TEMPLATES = (
    "a photo of {s}",
    "{s}, close-up",
    "a detailed picture of {s}",
    "{s} seen from a distance",
    "a cropped image showing {s}",
    "high resolution photograph of {s}",
)


@dataclass
class PhotosConfig:
    """`build_photos`: where and how many."""

    out: str = ""  # output dir or s3://bucket/prefix
    samples: int = 2000
    samples_per_shard: int = 256
    min_side: int = 256  # long side of each image drawn from [min_side, max_side]
    max_side: int = 768
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)


def _sources() -> list[tuple[str, str, np.ndarray]]:
    import skimage.data

    out = []
    for name, subject in SOURCES:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append((name, subject, np.ascontiguousarray(arr[..., :3]).astype(np.uint8)))
    return out


def photo_samples(cfg: PhotosConfig) -> Iterator[tuple[str, dict[str, bytes], dict]]:
    """(key, members, fields) for `cfg.samples` samples, in key order."""
    rng = np.random.default_rng([cfg.seed, 27])
    sources = _sources()
    for i in range(cfg.samples):
        name, subject, arr = sources[int(rng.integers(len(sources)))]
        h, w = arr.shape[:2]
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.67))))  # w / h of the crop
        scale = rng.uniform(0.35, 1.0)
        ch = max(16, int(min(h, w / aspect) * scale))
        cw = max(16, min(w, int(ch * aspect)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        long_side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
        if cw >= ch:
            size = (long_side, max(1, round(long_side * ch / cw)))
        else:
            size = (max(1, round(long_side * cw / ch)), long_side)
        img = Image.fromarray(arr[y : y + ch, x : x + cw]).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        jpg = buf.getvalue()
        key = f"{i // cfg.samples_per_shard:05d}{i % cfg.samples_per_shard:04d}"
        caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(s=subject)
        fields = {
            "url": f"skimage://{name}/{y},{x},{ch},{cw}", "caption": caption, "key": key,
            "status": "success", "error_message": None, "width": size[0], "height": size[1],
            "original_width": cw, "original_height": ch, "exif": "{}",
            "sha256": hashlib.sha256(jpg).hexdigest(),
            "similarity": round(float(rng.uniform(0.2, 0.4)), 6),
            "punsafe": round(float(rng.beta(1, 20)), 6),
            "pwatermark": round(float(rng.beta(1, 4)), 6),
        }  # fmt: skip
        members = {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(fields).encode()}
        yield key, members, fields


def build_photos(cfg: PhotosConfig, log=print) -> list[str]:
    """Write the shards, sidecars and stats under `cfg.out`; return the shard URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 16 <= cfg.min_side <= cfg.max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {cfg.min_side}, {cfg.max_side}")
    out = fs.resolve(cfg.out, storage=cfg.storage)
    fs.ensure_dir(out)
    uris: list[str] = []
    shard: list = []

    def flush():
        idx = len(uris)
        loc = out.join(f"{idx:05d}.tar")
        write_shard(loc, [(k, m) for k, m, _ in shard])
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([f for _, _, f in shard]), buf)
        fs.write_bytes_atomic(out.join(f"{idx:05d}.parquet"), buf.getvalue())
        stats = {"count": len(shard), "successes": len(shard), "failed_to_download": 0}
        fs.write_bytes_atomic(out.join(f"{idx:05d}_stats.json"), json.dumps(stats).encode())
        uris.append(loc.uri)
        shard.clear()

    for sample in photo_samples(cfg):
        shard.append(sample)
        if len(shard) == cfg.samples_per_shard:
            flush()
    if shard:
        flush()
    log(f"photos: {cfg.samples} samples in {len(uris)} shard(s) -> {out.uri}")
    return uris


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    build_photos(PhotosConfig(out=a.out, samples=a.samples, samples_per_shard=a.samples_per_shard,
                              seed=a.seed))  # fmt: skip


if __name__ == "__main__":
    main()
