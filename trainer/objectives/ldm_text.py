"""The latent-diffusion objective's text conditioning, chosen once from the dataset's manifest.

    text: states (and synthetic data)   StoredStates:       the rows' `text_embedding` as is
    text: tokens                        FrozenTextEncoder:  the rows' `text_tokens` -> the text
                                                            encoder the dataset names -> states

Both take a batch and the caption-dropout draw and give (text (B, L, D) float32, mask (B, L)
bool); a dropped row conditions on the empty caption (its stored states, or its ids through the
encoder). The training step calls whichever one the objective built: no per-step branch on the
storage format (STYLE.md principle 7).

The frozen encoder is not part of the engine's module: no gradients, no optimizer state, no ZeRO
partitioning, not in `model.safetensors`. It runs on the worker's device in the engine's precision
and is loaded from the path + sha256 the manifest records (`t2i tokenize` wrote the same fields
for `text: states`), so its states are the ones `text: states` would have stored (before fp16
rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from data_pipeline import token_dataset as T


class StoredStates:
    """`text: states`: the batch's states; a dropped caption takes the empty caption's."""

    def __init__(self, uncond: dict[str, torch.Tensor]):
        self.uncond = uncond  # text_embedding (L, D) float32, text_mask (L,) bool, on the device

    def __call__(self, batch: dict[str, torch.Tensor], drop: torch.Tensor):
        text, mask = batch[T.TEXT_EMBEDDING].float(), batch[T.TEXT_MASK].bool()  # (B, L, D), (B, L)
        u_text, u_mask = self.uncond[T.TEXT_EMBEDDING], self.uncond[T.TEXT_MASK]
        text = torch.where(drop[:, None, None], u_text.expand_as(text), text)
        mask = torch.where(drop[:, None], u_mask.expand_as(mask), mask)
        return text, mask


class FrozenTextEncoder:
    """`text: tokens`: the batch's ids (a dropped caption: the empty caption's ids) through the
    dataset's frozen text encoder, `encode(ids (B, L) int64, mask (B, L) bool) -> (B, L, D)`."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        empty_ids: torch.Tensor,  # (L,) int64, on the device
        pad_id: int,
    ):
        self.encode, self.empty_ids, self.pad_id = encode, empty_ids, pad_id

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], drop: torch.Tensor):
        ids = batch[T.TEXT_TOKENS].long()  # (B, L)
        ids = torch.where(drop[:, None], self.empty_ids.expand_as(ids), ids)
        mask = ids != self.pad_id
        return self.encode(ids, mask).float(), mask


def build_conditioning(manifest: dict | None, uncond: dict[str, torch.Tensor], *, storage,
                       device: torch.device, dtype: torch.dtype):  # fmt: skip
    """The conditioning a dataset asks for (`manifest` None: synthetic data, stored states)."""
    if manifest is None or T.latent_text(manifest) == "states":
        return StoredStates(uncond)
    empty = (manifest.get("empty_caption") or {}).get("text_tokens")
    if not isinstance(empty, list) or len(empty) != manifest["text_len"]:
        raise ValueError(
            "latent dataset (text: tokens): manifest empty_caption.text_tokens must list the "
            f"empty caption's {manifest.get('text_len')} ids, got {empty!r}"
        )
    encode = load_frozen_encoder(manifest["text_encoder"], storage=storage, device=device,
                                 dtype=dtype)  # fmt: skip
    ids = torch.from_numpy(np.asarray(empty, np.int64)).to(device)
    return FrozenTextEncoder(encode, ids, int(manifest["text_pad_id"]))


def _frozen(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def load_frozen_encoder(entry: dict, *, storage, device, dtype):
    """`encode(ids, mask) -> states` of the text encoder a latent manifest records
    (`text_encoder`: an open_clip text tower, or a diffusers CLIPTextModel under `pretrained`),
    its weights checked against the recorded sha256. Torch's global RNG is left as it was (a
    random-weights encoder is built from a fixed seed; the loop's noise stream must not move)."""
    want = entry.get("checkpoint_sha256", "")
    with torch.random.fork_rng():
        if entry.get("pretrained"):  # a Stable Diffusion pipeline folder's text encoder
            from trainer.pretrained.diffusers_sd import load_text_encoder, local_copy

            root = local_copy(entry["pretrained"], storage, what="text_encoder").path
            enc = load_text_encoder(root)
            got, model = enc.fingerprint, _frozen(enc.model, device, dtype)
            use_mask = enc.use_attention_mask

            def encode(ids, mask):
                return model(ids, attention_mask=mask.long() if use_mask else None)[0]
        else:
            from data_pipeline.tokenize.stages import text_token_states
            from trainer.pretrained.clip_models import ClipSpec, build_clip, fetch_weights

            spec = ClipSpec(entry["model"], entry.get("model_config"), entry.get("checkpoint", ""),
                            1, 1, storage=storage)  # fmt: skip
            got = fetch_weights(spec, "text_encoder").sha256 if spec.checkpoint else ""
            model = build_clip(spec, "cpu", what="text_encoder")[0]
            model.visual = torch.nn.Identity()  # only the text tower runs
            model = _frozen(model, device, dtype)

            def encode(ids, mask):
                return text_token_states(model, ids)

    if got != want:
        raise ValueError(
            f"text_encoder {entry.get('checkpoint') or entry.get('pretrained')}: sha256 "
            f"{got[:12]}... but the latent dataset recorded {want[:12]}... (its ids must be "
            f"encoded by the encoder it was tokenized for)"
        )
    return encode
