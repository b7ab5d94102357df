"""The Ray Data stages of `t2i tokenize`: decode (CPU), text BPE (CPU), image tokenizer and text
encoder (actor pools), and the part writer.

Stages take and return `dict[str, np.ndarray]` batches keyed by the constants below and in
`data_pipeline.columns`; their constructor arguments are plain data (specs), so they cross the Ray
boundary without pickling models or configs.

Determinism: model stages run every forward pass at exactly `batch_size` rows (short batches are
zero-padded, as in `clip_score.ClipScorer`), with a fixed thread count. A row's result then does not
depend on which rows share its batch — Ray Data does not fix that between runs — so a resumed run
encodes every sample bit-identically to an uninterrupted one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from data_pipeline import columns as C
from data_pipeline import resumable
from data_pipeline import token_dataset as T
from data_pipeline.config import StorageConfig
from data_pipeline.devices import assigned_device
from data_pipeline.validate import decode_image, resize_center_crop, resize_cover_crop

PART_META_KEY = b"t2i_tokenize_part"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class ImageEncoderSpec:
    """What an image-tokenizer actor needs (plain data)."""

    path: str  # tokenizer dir / run (local or s3://)
    storage: StorageConfig | None  # the job's S3 endpoint, region, retries and timeouts
    batch_size: int  # rows per forward pass (short batches are padded to it)
    threads: int  # torch threads per actor
    flip: bool = False  # also encode the mirrored image (`latent_flip`)
    # the (H, W) aspect-ratio buckets of `DecodeBuckets` (pixels arrive flat); (): squares
    buckets: tuple[tuple[int, int], ...] = ()
    image_size: int = 0  # buckets: the square side S whose latent buffer every row fills


@dataclass(frozen=True)
class TextEncoderSpec:
    """What a text-encoder actor needs: an open_clip model (see `clip_score.ClipSpec`)."""

    model: str
    model_config: dict | None
    checkpoint: str  # local path or s3:// (fetched once per node); "": random weights
    batch_size: int
    threads: int
    checkpoint_activation: str = "auto"  # see `clip_models.ClipSpec`
    storage: object | None = None  # the job's StorageConfig, for an s3:// checkpoint
    # a Stable Diffusion pipeline folder (or a CLIPTextModel folder): its CLIPTextModel encodes,
    # as its pipeline does (`trainer.pretrained.diffusers_sd`); `model`... are then unused
    pretrained: str = ""


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pad the first axis of `x` to `rows` (fixed-shape forward passes)."""
    if len(x) >= rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def _device(num_threads: int) -> str:
    import torch

    torch.set_num_threads(max(1, num_threads))
    return assigned_device()  # the GPU only if Ray gave this actor one


# --------------------------------------------------------------------------------------------
# CPU stages
# --------------------------------------------------------------------------------------------


class DecodeSquare:
    """Image bytes -> `pixels` (S, S, 3) uint8: shorter side to S, centre crop (the same transform
    as preprocess's CLIP input). A failure quarantines the row (`reason`), never the job."""

    def __init__(self, image_size: int, max_pixels: int):
        self.size, self.max_pixels = image_size, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[C.KEY])
        reasons = batch[C.REASON].astype(object)
        details = batch[C.DETAIL].astype(object)
        pixels = np.zeros((n, self.size, self.size, 3), np.uint8)
        for i in range(n):
            if reasons[i]:
                continue
            rgb, reason, detail = decode_image(bytes(batch[C.IMAGE][i]), self.max_pixels)
            if rgb is None:  # no object addresses in the detail: outputs must be reproducible
                reasons[i], details[i] = reason, _ADDRESS.sub("", detail)
            else:
                pixels[i] = resize_center_crop(Image.fromarray(rgb), self.size)
        out = {k: v for k, v in batch.items() if k not in (C.IMAGE, C.IMAGE_EXT)}
        out.update({C.REASON: reasons.astype(str), C.DETAIL: details.astype(str), C.PIXELS: pixels})
        return out


class DecodeBuckets:
    """`buckets: true`: image bytes -> `pixels` (S*S*3,) uint8, the image resized to cover the
    bucket nearest its aspect ratio (`buckets.assign_bucket`) and centre-cropped to that
    (H, W), flattened, zero-padded to the square's size; `bucket` (int32) its index. Every row
    then has one width in flight (H*W <= S*S). Failures quarantine the row, as `DecodeSquare`."""

    def __init__(self, image_size: int, max_pixels: int, buckets: list[tuple[int, int]]):
        self.size, self.max_pixels, self.buckets = image_size, max_pixels, list(buckets)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from data_pipeline.tokenize.buckets import assign_bucket

        n = len(batch[C.KEY])
        reasons = batch[C.REASON].astype(object)
        details = batch[C.DETAIL].astype(object)
        pixels = np.zeros((n, self.size * self.size * 3), np.uint8)
        bucket = np.zeros(n, np.int32)
        for i in range(n):
            if reasons[i]:
                continue
            rgb, reason, detail = decode_image(bytes(batch[C.IMAGE][i]), self.max_pixels)
            if rgb is None:
                reasons[i], details[i] = reason, _ADDRESS.sub("", detail)
                continue
            bucket[i] = assign_bucket(rgb.shape[1], rgb.shape[0], self.buckets)
            h, w = self.buckets[bucket[i]]
            pixels[i, : h * w * 3] = resize_cover_crop(Image.fromarray(rgb), h, w).reshape(-1)
        out = {k: v for k, v in batch.items() if k not in (C.IMAGE, C.IMAGE_EXT)}
        out.update({C.REASON: reasons.astype(str), C.DETAIL: details.astype(str),
                    C.PIXELS: pixels, C.BUCKET: bucket})  # fmt: skip
        return out


class TokenizeText:
    """Captions -> `text_tokens` (B, text_len) int32 with the dataset's `TextTokenizer`."""

    def __init__(self, tokenizer_json: bytes):
        from data_pipeline.text_tokens import TextTokenizer

        self.tok = TextTokenizer.from_bytes(tokenizer_json)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch[C.CAPTION]]
        return {**batch, T.TEXT_TOKENS: self.tok.encode(captions)}


# --------------------------------------------------------------------------------------------
# Model stages (actor pools)
# --------------------------------------------------------------------------------------------


def code_dtype(vocab_size: int) -> np.dtype:
    """int16 when every code fits (K <= 32768), else int32: halves the dataset for common K."""
    return np.dtype(np.int16) if vocab_size <= 1 << 15 else np.dtype(np.int32)


class EncodeImages:
    """`pixels` -> `image_codes` (B, h*w) row-major (dVAE/VQGAN) or `latent` (B, C*h*w) float16
    (KL-AE, already scaled). Quarantined rows get zeros (the writer drops them)."""

    def __init__(self, spec: ImageEncoderSpec, tokenizer=None):
        from trainer.pretrained.image_tokenizers import load_image_tokenizer

        self.spec = spec
        self.device = _device(spec.threads)
        self.tok = tokenizer or load_image_tokenizer(
            spec.path,
            storage=spec.storage,
            device=self.device,
        )

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 -> (B, h*w) codes or (B, C*h*w) float16 latents."""
        import torch

        b = len(pixels)
        with torch.inference_mode():
            x = torch.from_numpy(_pad_rows(np.ascontiguousarray(pixels), self.spec.batch_size))
            x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) in [0, 1]
            out = self.tok.encode(x)[:b].cpu()  # (B, h, w) int64 or (B, C, h, w) float
        if self.tok.discrete:
            return out.reshape(b, -1).numpy().astype(code_dtype(self.tok.vocab_size))
        return out.float().reshape(b, -1).numpy().astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch[C.PIXELS]
        ok = np.flatnonzero(batch[C.REASON] == "")
        column = T.IMAGE_CODES if self.tok.discrete else T.LATENT
        out = {k: v for k, v in batch.items() if k not in (C.PIXELS, C.BUCKET)}
        if self.spec.buckets:
            return {**out, **self._encode_buckets(pixels, batch[C.BUCKET], ok)}
        result = flipped = None
        for start in range(0, len(ok), self.spec.batch_size):
            idx = ok[start : start + self.spec.batch_size]
            enc = self.encode(pixels[idx])
            if result is None:
                result = np.zeros((len(pixels), enc.shape[1]), enc.dtype)
                flipped = np.zeros_like(result) if self.spec.flip else None
            result[idx] = enc
            if self.spec.flip:  # (B, S, S, 3): mirrored along the width
                flipped[idx] = self.encode(pixels[idx][:, :, ::-1])
        if result is None:  # nothing valid in this batch: any width will do, rows are dropped
            result = np.zeros((len(pixels), 1), np.float16 if column == T.LATENT else np.int16)
            flipped = result
        out[column] = result
        if self.spec.flip:
            out[T.LATENT_FLIP] = flipped
        return out

    def _encode_buckets(self, pixels: np.ndarray, bucket: np.ndarray, ok: np.ndarray) -> dict:
        """`buckets`: each bucket's rows encoded together at its (H, W) in fixed-size passes;
        latents (C*h*w) zero-padded to the square's C*g*g, with `latent_h`, `latent_w` and
        `latent_len` (the writer stores C*h*w values per row)."""
        f, c = self.tok.downsample, self.tok.latent_channels
        n, g = len(pixels), self.spec.image_size // self.tok.downsample
        result = np.zeros((n, c * g * g), np.float16)
        flipped = np.zeros_like(result)
        lat_h, lat_w = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for b in sorted(set(bucket[ok].tolist())):
            h, w = self.spec.buckets[b]
            rows = ok[bucket[ok] == b]
            for start in range(0, len(rows), self.spec.batch_size):
                idx = rows[start : start + self.spec.batch_size]
                img = pixels[idx, : h * w * 3].reshape(-1, h, w, 3)  # (B, H, W, 3)
                result[idx, : c * (h // f) * (w // f)] = self.encode(img)
                if self.spec.flip:
                    flipped[idx, : c * (h // f) * (w // f)] = self.encode(img[:, :, ::-1])
            lat_h[rows], lat_w[rows] = h // f, w // f
        out = {T.LATENT: result, T.LATENT_H: lat_h, T.LATENT_W: lat_w,
               C.LATENT_LEN: c * lat_h.astype(np.int64) * lat_w}  # fmt: skip
        if self.spec.flip:
            out[T.LATENT_FLIP] = flipped
        return out


def text_token_states(model, tokens):
    """open_clip CLIP text tower -> per-token states (B, L, width) after the final LayerNorm:
    the cross-attention context of latent diffusion (the pooled vector throws positions away)."""
    if not hasattr(model, "token_embedding"):
        raise ValueError(
            f"text_encoder: {type(model).__name__} has no built-in text tower (token_embedding); "
            f"use an open_clip CLIP architecture"
        )
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)  # (B, L, W)
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


class EmbedText:
    """`text_tokens` (open_clip ids) -> `text_embedding` (B, L*D) float16, per-token states."""

    def __init__(self, spec: TextEncoderSpec):
        from data_pipeline.clip_score import ClipSpec, build_clip

        self.spec = spec
        self.device = _device(spec.threads)
        self.sd = None
        if spec.pretrained:  # SD: CLIPTextModel last_hidden_state, no mask unless configured
            from trainer.pretrained.diffusers_sd import load_text_encoder, local_copy

            root = local_copy(spec.pretrained, spec.storage, what="pretrained").path
            self.sd = load_text_encoder(root, self.device)
            return
        clip_spec = ClipSpec(spec.model, spec.model_config, spec.checkpoint, spec.batch_size, 1,
                             spec.checkpoint_activation, spec.storage)  # fmt: skip
        self.model = build_clip(clip_spec, self.device, what="text_encoder.checkpoint")[0]

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        b = len(tokens)
        with torch.inference_mode():
            ids = torch.from_numpy(_pad_rows(tokens.astype(np.int64), self.spec.batch_size))
            if self.sd is not None:
                mask = ids != self.sd.pad_id if self.sd.use_attention_mask else None
                states = self.sd.encode(ids, mask)[:b]
            else:
                states = text_token_states(self.model, ids.to(self.device))[:b]
        return states.float().reshape(b, -1).cpu().numpy().astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.asarray(batch[T.TEXT_TOKENS])
        parts = [
            self.encode(tokens[s : s + self.spec.batch_size])
            for s in range(0, len(tokens), self.spec.batch_size)
        ]
        return {**batch, T.TEXT_EMBEDDING: np.concatenate(parts)}


# --------------------------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------------------------

# Payload columns and their Arrow types (list columns hold one row's flattened array).
PAYLOAD_TYPES = {
    T.TEXT_TOKENS: pa.list_(pa.int32()),
    T.IMAGE_CODES: None,  # int16 or int32 list: from the batch
    T.LATENT: pa.list_(pa.float16()),
    T.LATENT_FLIP: pa.list_(pa.float16()),
    T.TEXT_EMBEDDING: pa.list_(pa.float16()),
}
RAGGED = (T.LATENT, T.LATENT_FLIP)  # with `latent_len` in the batch: C*h*w values per row
GRID_TYPES = {T.LATENT_H: pa.int32(), T.LATENT_W: pa.int32()}  # `buckets: true`
ID_TYPES = {
    C.SHARD_IDX: pa.int64(),
    C.SEQ: pa.int64(),
    C.SHARD_ROWS: pa.int64(),
    C.KEY: pa.string(),
    C.CAPTION: pa.string(),
    C.REASON: pa.string(),
    C.DETAIL: pa.string(),
}


def list_column(
    values: np.ndarray, item_type: pa.DataType, lengths: np.ndarray | None = None
) -> pa.Array:
    """(B, N) array -> Arrow list<item_type> without a Python loop; with `lengths` (B,), row i
    holds only its first lengths[i] values (a zero-padded ragged batch)."""
    values = np.ascontiguousarray(values)
    b, n = values.shape
    if lengths is not None:
        lengths = np.asarray(lengths, np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
        kept = values[np.arange(n)[None, :] < lengths[:, None]]  # row-major: row 0's first
        return pa.ListArray.from_arrays(offsets, pa.array(kept, type=item_type))
    offsets = pa.array(np.arange(0, (b + 1) * n, n, dtype=np.int32) if b else [0], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=item_type))


def batch_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A batch of encoded rows as an Arrow table (identity columns + whichever payloads exist)."""
    arrays = {
        name: pa.array(np.asarray(batch[name]).tolist(), type=typ) for name, typ in ID_TYPES.items()
    }
    for name in PAYLOAD_TYPES:
        if name in batch:
            values = np.asarray(batch[name])
            lengths = batch.get(C.LATENT_LEN) if name in RAGGED else None
            arrays[name] = list_column(values, pa.from_numpy_dtype(values.dtype), lengths)
    for name, typ in GRID_TYPES.items():
        if name in batch:
            arrays[name] = pa.array(np.asarray(batch[name]).astype(np.int32), type=typ)
    return pa.table(arrays)


def commit_part(
    batch: dict[str, np.ndarray],
    *,
    parts_uri: str,
    storage: StorageConfig | None,
    fault: resumable.Fault | None = None,
) -> dict:
    """Commit a batch as one Parquet part (`resumable.commit_part`)."""
    loc, _, meta = resumable.commit_part(
        batch_table(batch),
        batch,
        parts_uri=parts_uri,
        storage=storage,
        fault=fault,
        phase="parts",
        meta_key=PART_META_KEY,
    )
    return {"part": [loc.path], "meta": [meta]}
