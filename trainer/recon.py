"""Reconstruction quality of image tokenizers: PSNR, and the digits splits it is measured on.

    images = load_split_images("runs/demo/digits", "val")            # uint8 (N, H, W, 3)
    tok = load_image_tokenizer("runs/demo/train/klae-digits")
    reconstruction_psnr(tok, images)                                 # dB, mean over images

Convention (as in the VQGAN / latent-diffusion papers' tables): PSNR is computed per image on
values in [0, 1] (float reconstructions, not re-quantised to 8 bits) and averaged over images.
`psnr` of identical inputs is +inf (MSE 0); the per-image values that `reconstruction_psnr`
averages are capped at `PSNR_CAP_DB` (an MSE of 1e-10) so that one exact reconstruction cannot
turn the mean into inf. Used by the klae objective's metrics, `t2i eval` and
`benchmarks/tokenizers.py`.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from data_pipeline import fs
from data_pipeline.config import StorageConfig

PSNR_CAP_DB = 100.0  # per-image cap in `reconstruction_psnr`: 10 * log10(1 / 1e-10)
MAX_PIXELS = 4_000_000  # a split image larger than this is refused (decompression bombs)


def psnr(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape arrays of values in [0, 1], over all
    their elements: 10 log10(1 / MSE). Identical inputs give +inf."""
    a, b = _as_float64(x), _as_float64(y)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def per_image_psnr(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR (dB) of each image of two (N, ...) batches in [0, 1], capped at `PSNR_CAP_DB`: (N,)."""
    a, b = _as_float64(x), _as_float64(y)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"per_image_psnr: need equal (N, ...) shapes, got {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return np.minimum(-10.0 * np.log10(np.maximum(mse, 1e-300)), PSNR_CAP_DB)


def pixels_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or float (N, H, W, 3) in [0, 1] -> float32 (N, 3, H, W) in [0, 1]."""
    t = torch.as_tensor(images)
    if t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float().div(255.0)
    elif not t.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {t.dtype}")
    return t.float().permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of images (N, C, S, S) in [0, 1] (e.g. originals over reconstructions) -> one uint8
    (rows*S, N*S, 3) picture; 1-channel images are shown as gray."""
    lines = [torch.cat(list(r.detach().float().cpu().clamp(0, 1)), dim=2) for r in rows]
    pic = torch.cat(lines, dim=1)  # (C, rows*S, N*S)
    if pic.shape[0] == 1:
        pic = pic.expand(3, -1, -1)
    return (pic[:3].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def reconstruct(
    tokenizer, images: np.ndarray | torch.Tensor, *, batch_size: int = 64
) -> torch.Tensor:
    """encode -> decode every image: (N, H, W, 3) uint8 or float in [0, 1] -> float32
    (N, 3, H, W) in [0, 1] on the CPU. H and W must be multiples of `tokenizer.downsample`."""
    x = pixels_to_unit(images)
    param = next(tokenizer.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = [
        tokenizer.decode(tokenizer.encode(x[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else torch.empty_like(x)


def reconstruction_psnr(
    tokenizer, images: np.ndarray | torch.Tensor, *, batch_size: int = 64
) -> float:
    """Mean per-image PSNR (dB, each capped at `PSNR_CAP_DB`) of `tokenizer`'s reconstructions."""
    if len(images) == 0:
        raise ValueError("reconstruction_psnr: no images")
    recon = reconstruct(tokenizer, images, batch_size=batch_size)
    return float(per_image_psnr(recon, pixels_to_unit(images)).mean())


def load_split_images(
    shards_uri: str,
    split: str = "val",
    *,
    multiple_of: int = 1,
    limit: int = 0,
    storage: StorageConfig | None = None,
) -> np.ndarray:
    """Images of one split of a `t2i data digits` directory (`<shards_uri>/<split>/*.tar`: `val`
    held-out digits, `photos` real photo crops, `train`) as uint8 (N, H, W, 3), in shard order.

    Images whose sides are not multiples of `multiple_of` (a tokenizer's downsampling factor) are
    resized (bicubic) to the nearest multiple. All images of the split must share one size.
    `limit` > 0 keeps the first `limit` images. Shards are read as tar members only: PNG/JPEG
    bytes are decoded with a pixel limit and nothing is unpickled. `storage` (the job's config
    section) sets the S3 endpoint, region, retries and timeouts.
    """
    from data_pipeline.shards import iter_tar_samples

    base = fs.resolve(shards_uri, storage=storage).join(split)
    paths = fs.list_files(base, ".tar")
    if not paths:
        raise FileNotFoundError(f"{base.uri}: no .tar shards (is {shards_uri} a digits dir?)")
    images: list[np.ndarray] = []
    for path in paths:
        uri = f"{base.uri.rstrip('/')}/{path[len(base.path.rstrip('/')) + 1 :]}"
        data = fs.read_bytes(fs.Location(base.fs, path, uri))
        for key, members in iter_tar_samples(data):
            payload = next((members[e] for e in ("png", "jpg", "jpeg") if e in members), None)
            if payload is None:
                raise ValueError(f"{uri}: sample {key!r} has no png/jpg image")
            img = _decode(payload, multiple_of, f"{uri}:{key}")
            if images and img.shape != images[0].shape:
                raise ValueError(
                    f"{uri}: sample {key!r} is {img.shape[1]}x{img.shape[0]}, the split's first "
                    f"image is {images[0].shape[1]}x{images[0].shape[0]}"
                )
            images.append(img)
            if limit and len(images) >= limit:
                return np.stack(images)
    return np.stack(images)


def _decode(data: bytes, multiple_of: int, where: str) -> np.ndarray:
    """Encoded image -> RGB uint8 (H, W, 3), sides rounded to the nearest multiple of
    `multiple_of` (at least one multiple)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{where}: {im.width}x{im.height} exceeds {MAX_PIXELS} pixels")
        rgb = im.convert("RGB")
    m = max(int(multiple_of), 1)
    size = tuple(max(m, m * round(s / m)) for s in rgb.size)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
