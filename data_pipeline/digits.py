"""The bundled real dataset: scikit-learn's 1797 handwritten digits as captioned WebDataset shards.

Pixel mapping: the UCI digits are 8x8 counts of inked pixels in 4x4 blocks, values 0..16 with 0 =
blank paper. We map v -> round(v * 255 / 16) so ink is bright: a white digit on a black background
(the MNIST convention), then upscale bilinearly to `image_size` and store 3-channel PNGs so every
recipe sees ordinary RGB images.

Layout written under `out`:
    train/digits-00000.tar ...   samples: <key>.png, <key>.txt (caption), <key>.json (metadata)
    val/digits-00000.tar ...     deterministic held-out split
    photos/photos-00000.tar      real photo crops (scikit-image's bundled images), for tokenizer checks
    manifest.json                written last: version, counts, sha256 per shard, build config

Captions come from several templates per digit. With `mismatch_fraction > 0`, that fraction of the
training and validation captions names a *different* digit; the sample's json records
`mismatched: true` and both labels, so the CLIP filter can be scored against ground truth.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from data_pipeline import fs
from data_pipeline.config import REQUIRED, StorageConfig
from data_pipeline.manifest import read_manifest, write_manifest
from data_pipeline.shards import Sample, ShardInfo, write_shards

MANIFEST_FORMAT = "ray-t2i/webdataset"  # shared by every stage that writes WebDataset shards
MANIFEST_VERSION = 1


@dataclass
class DigitsConfig:
    """`t2i data digits`: scikit-learn's bundled handwritten digits as WebDataset shards."""

    out: str = REQUIRED  # output directory or s3://bucket/prefix
    image_size: int = 32  # 8x8 digits are upscaled (bilinear) to image_size x image_size
    val_fraction: float = 0.1  # deterministic held-out split
    samples_per_shard: int = 256
    mismatch_fraction: float = 0.0  # fraction of captions swapped to a wrong digit (recorded)
    seed: int = 0
    photos: int = 64  # real photo crops (scikit-image samples) for tokenizer checks; 0: none
    photo_size: int = 64  # side of each photo crop
    storage: StorageConfig = field(default_factory=StorageConfig)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Templates used in the shards. `{w}` is the digit as a word, `{d}` as a numeral.
TRAIN_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {d}",
    "a photo of the digit {d}",
    "a picture of a handwritten {w}",
    "the digit {w} written by hand",
    "an image of the number {w}",
)
# Never written to the shards: prompts for checking that sampling generalises to new phrasing.
HELDOUT_TEMPLATES = (
    "a drawing of the numeral {d}",
    "someone wrote the number {w}",
)

# (name, caption) of the scikit-image sample images used for photo crops; all ship with the package.
PHOTO_SOURCES = (
    ("astronaut", "a photo of an astronaut"),
    ("coffee", "a photo of a cup of coffee"),
    ("chelsea", "a photo of a cat"),
    ("rocket", "a photo of a rocket on a launch pad"),
    ("camera", "a black and white photo of a cameraman"),
    ("coins", "a photo of old coins"),
    ("immunohistochemistry", "a microscope image of stained tissue"),
    ("hubble_deep_field", "a telescope image of distant galaxies"),
)


def caption_for(digit: int, template: str) -> str:
    return template.format(w=DIGIT_WORDS[digit], d=digit)


def digit_to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """8x8 array of 0..16 ink counts -> RGB image, white ink on black, `size` x `size`."""
    if pixels.shape != (8, 8):
        raise ValueError(f"digit pixels must be 8x8, got {pixels.shape}")
    gray = np.rint(pixels.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(gray, mode="L")
    if size != 8:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)  # PIL writes no timestamp: bytes are deterministic
    return buf.getvalue()


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index arrays, each sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def digit_samples(cfg: DigitsConfig, split: str, indices: np.ndarray) -> Iterator[Sample]:
    """Yield (key, members) for the digits at `indices`, captions and mismatches seeded per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([cfg.seed, 1 if split == "train" else 2])
    templates = rng.integers(0, len(TRAIN_TEMPLATES), size=len(indices))
    mismatched = rng.random(len(indices)) < cfg.mismatch_fraction
    offsets = rng.integers(1, 10, size=len(indices))  # wrong label = (label + offset) % 10
    for j, idx in enumerate(indices):
        label = int(digits.target[idx])
        caption_label = (label + int(offsets[j])) % 10 if mismatched[j] else label
        caption = caption_for(caption_label, TRAIN_TEMPLATES[templates[j]])
        meta = {
            "source": "sklearn.digits",
            "index": int(idx),
            "split": split,
            "label": label,
            "caption_label": caption_label,
            "mismatched": bool(mismatched[j]),
            "template": int(templates[j]),
        }
        yield (
            f"digit{int(idx):04d}",
            {
                "png": encode_png(digit_to_image(digits.images[idx], cfg.image_size)),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            },
        )


def photo_samples(count: int, size: int, seed: int) -> Iterator[Sample]:
    """Random `size` x `size` RGB crops of scikit-image's bundled sample photos."""
    import skimage.data

    rng = np.random.default_rng([seed, 3])
    sources = []
    for name, caption in PHOTO_SOURCES:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        sources.append((name, caption, arr[..., :3].astype(np.uint8)))
    for i in range(count):
        name, caption, arr = sources[i % len(sources)]
        h, w = arr.shape[:2]
        # Crop a random square of 1/4..1/1 of the short side, then resize: varied scale and detail.
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(arr[y : y + side, x : x + side]).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        meta = {"source": f"skimage.data.{name}", "crop": [y, x, side], "split": "photos"}
        yield (
            f"photo{i:04d}",
            {
                "png": encode_png(crop),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            },
        )


def _shard_entries(base: fs.Location, infos: list[ShardInfo]) -> list[dict]:
    root = base.path.rstrip("/") + "/"
    return [
        {"path": i.path[len(root) :], "samples": i.samples, "bytes": i.bytes, "sha256": i.sha256}
        for i in infos
    ]


def build_digits(cfg: DigitsConfig, log=print) -> dict:
    """Write the digits (and photo) shards and a manifest under `cfg.out`; return the manifest."""
    if cfg.image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {cfg.image_size}")
    if not 0.0 <= cfg.mismatch_fraction <= 1.0:
        raise ValueError(f"mismatch_fraction must be in [0, 1], got {cfg.mismatch_fraction}")
    from sklearn.datasets import load_digits

    out = fs.resolve(cfg.out, storage=cfg.storage)
    fs.ensure_dir(out)
    n = len(load_digits().target)
    train_idx, val_idx = split_indices(n, cfg.val_fraction, cfg.seed)
    splits: dict[str, dict] = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        infos = write_shards(
            out.join(split),
            digit_samples(cfg, split, idx),
            samples_per_shard=cfg.samples_per_shard,
            prefix="digits",
        )
        splits[split] = {"samples": int(len(idx)), "shards": _shard_entries(out, infos)}
        log(
            f"data: wrote {len(idx)} {split} digits in {len(infos)} shard(s) to {out.join(split).uri}"
        )
    if cfg.photos > 0:
        infos = write_shards(
            out.join("photos"),
            photo_samples(cfg.photos, cfg.photo_size, cfg.seed),
            samples_per_shard=cfg.samples_per_shard,
            prefix="photos",
        )
        splits["photos"] = {"samples": cfg.photos, "shards": _shard_entries(out, infos)}
        log(f"data: wrote {cfg.photos} photo crops to {out.join('photos').uri}")
    config = asdict(cfg)
    config.pop("storage")  # where the data went is not part of what the data is
    config.pop("out")
    manifest_loc = write_manifest(
        out,
        MANIFEST_FORMAT,
        MANIFEST_VERSION,
        {
            "dataset": "digits",
            "pixel_mapping": "v in 0..16 -> round(v*255/16); ink white on black; bilinear upscale; RGB PNG",
            "templates": list(TRAIN_TEMPLATES),
            "heldout_templates": list(HELDOUT_TEMPLATES),
            "config": config,
            "splits": splits,
        },
    )
    log(f"data: manifest at {manifest_loc.uri}")
    return read_manifest(out, MANIFEST_FORMAT, (MANIFEST_VERSION,))
