"""Per-sample image validation and decoding (CPU Ray Data tasks).

Image bytes are untrusted. The header is read first and the pixel count checked against
`max_pixels` before any pixel data is decoded (a 100 kB PNG can declare 50 000 x 50 000 pixels);
then the image is decoded, converted to RGB, hashed (for exact dedup) and resized + centre-cropped
to the CLIP input size, exactly like open_clip's eval transform (shorter side to S, bicubic).
A failure quarantines that row only.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image

from data_pipeline import columns as C


def pixel_hash(rgb: np.ndarray) -> str:
    """sha256 of an (H, W, 3) uint8 image's shape and pixels: equal iff the decoded images are."""
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> (size, size, 3) uint8: shorter side to `size` (bicubic), centre crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resize_cover_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL image -> (height, width, 3) uint8: scaled (bicubic) until it covers the target,
    centre crop; for a square target this is `resize_center_crop`."""
    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int) -> tuple[np.ndarray | None, str, str]:
    """Decode untrusted bytes to (H, W, 3) uint8 RGB; returns (rgb, reason, detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # parses the header only
            w, h = img.size
            if w * h > max_pixels:
                return None, C.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > {max_pixels}"
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, C.DECOMPRESSION_BOMB, str(e)
    except Exception as e:  # noqa: BLE001 — any decoder failure is this sample's problem only
        return None, C.UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}"
    try:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        return None, C.UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}"
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return None, C.UNDECODABLE_IMAGE, f"decoded to shape {rgb.shape}"
    return rgb, "", ""


class DecodeImages:
    """Ray Data CPU stage: image bytes -> width, height, pixel hash, CLIP-sized pixels.

    Drops the encoded bytes (the clean-shard writer re-reads them from the source shard), so
    only the small CLIP input travels on to the actor pool.
    """

    def __init__(self, max_pixels: int, clip_image_size: int):
        self.max_pixels = max_pixels
        self.size = clip_image_size  # 0: no CLIP stage, no pixels column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[C.KEY])
        reasons = batch[C.REASON].astype(object)
        details = batch[C.DETAIL].astype(object)
        width = np.zeros(n, np.int64)
        height = np.zeros(n, np.int64)
        hashes = np.full(n, "", dtype=object)
        pixels = np.zeros((n, self.size, self.size, 3), np.uint8) if self.size else None
        # Rows ready for CLIP have an image; Image.MAX_IMAGE_PIXELS stays PIL's own guard.
        for i in range(n):
            if reasons[i]:
                continue
            rgb, reason, detail = decode_image(bytes(batch[C.IMAGE][i]), self.max_pixels)
            if rgb is None:
                reasons[i], details[i] = reason, detail
                continue
            height[i], width[i] = rgb.shape[:2]
            hashes[i] = pixel_hash(rgb)
            if pixels is not None:
                pixels[i] = resize_center_crop(Image.fromarray(rgb), self.size)
        out = {k: v for k, v in batch.items() if k not in (C.IMAGE, C.IMAGE_EXT)}
        out.update(
            {
                C.REASON: reasons.astype(str),
                C.DETAIL: details.astype(str),
                C.WIDTH: width,
                C.HEIGHT: height,
                C.PIXEL_HASH: hashes.astype(str),
            }
        )
        if pixels is not None:
            out[C.PIXELS] = pixels
        return out
