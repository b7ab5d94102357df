"""The CLIP filter with a real (tiny) CLIP trained here on the digits: captions that name the wrong
digit (injected by `t2i data digits mismatch_fraction=...`) score lower and are removed."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.clip_score import ClipScorer, ClipSpec, register_model_config
from data_pipeline.config import load_config
from data_pipeline.digits import DigitsConfig, build_digits
from data_pipeline.preprocess.config import PreprocessConfig
from data_pipeline.preprocess.job import run_preprocess
from data_pipeline.shards import iter_tar_samples
from data_pipeline.validate import decode_image, resize_center_crop

MODEL = "t2i-test-clip"
# ~7.6M parameters, 6.3M of them the BPE token embedding; 16 image patches of 8x8.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


def load_split(root, split):
    """(pixels (N, 32, 32, 3) uint8, captions, metadata) of a digits split, in shard order."""
    from PIL import Image

    pixels, captions, metas = [], [], []
    for path in sorted((root / split).glob("*.tar")):
        for _, m in iter_tar_samples(path.read_bytes()):
            rgb, _, _ = decode_image(m["png"], 10**6)
            pixels.append(resize_center_crop(Image.fromarray(rgb), 32))
            captions.append(m["txt"].decode())
            metas.append(json.loads(m["json"]))
    return np.stack(pixels), captions, metas


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Train the tiny CLIP for 200 steps on clean digit captions; save it as an open_clip
    checkpoint. Returns (root, model-config path, checkpoint path, noisy digits dir)."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    root = tmp_path_factory.mktemp("clip")
    quiet = dict(log=lambda *_: None)
    build_digits(DigitsConfig(out=str(root / "clean"), photos=0), **quiet)
    build_digits(DigitsConfig(out=str(root / "noisy"), photos=0, mismatch_fraction=0.1), **quiet)
    cfg_path = root / f"{MODEL}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    register_model_config(MODEL, TINY_CLIP)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    pixels, captions, _ = load_split(root / "clean", "train")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens = tokenizer(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        img = model.encode_image(images[idx], normalize=True)
        txt = model.encode_text(tokens[idx], normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = root / "tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)  # open_clip's checkpoint layout
    print(f"\ntiny CLIP: 200 steps in {time.perf_counter() - t0:.1f}s, last loss {loss.item():.3f}")
    return root, cfg_path, ckpt


def test_checkpoint_loads_with_open_clip(tiny_clip):
    import open_clip

    _, _, ckpt = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(ckpt))
    assert preprocess is not None and model.visual.image_size == (32, 32)


def test_clip_filter_removes_mismatched_captions(ray_local, tiny_clip, tmp_path):
    root, cfg_path, ckpt = tiny_clip
    spec = ClipSpec(MODEL, TINY_CLIP, str(ckpt), batch_size=128, threads=1)
    scorer = ClipScorer(spec)

    # Choose the threshold on the validation split (best F1 at flagging mismatches).
    pixels, captions, metas = load_split(root / "noisy", "val")
    img, txt = [], []
    for s in range(0, len(captions), 128):
        i, t = scorer.encode(pixels[s : s + 128], captions[s : s + 128])
        img.append(i)
        txt.append(t)
    scores = (np.concatenate(img) * np.concatenate(txt)).sum(1)
    bad = np.array([m["mismatched"] for m in metas])
    assert scores[bad].mean() < scores[~bad].mean() - 0.1

    def f1(t):
        flagged = scores < t
        tp = (flagged & bad).sum()
        return 2 * tp / max(flagged.sum() + bad.sum(), 1)

    threshold = float(max(np.unique(scores) + 1e-6, key=f1))

    # Run the plan on the training split at that threshold; score the removals.
    out = tmp_path / "out"
    cfg = load_config(
        PreprocessConfig,
        None,
        [
            f"input={root / 'noisy' / 'train'}",
            f"output={out}",
            f"clip.model={MODEL}",
            f"clip.model_config={cfg_path}",
            f"clip.checkpoint={ckpt}",
            f"clip.threshold={threshold}",
            "clip.batch_size=128",
            "dedup.exact=false",
            "dedup.near=false",
        ],
    )
    manifest = run_preprocess(cfg, log=lambda *_: None)
    truth = {}
    for path in sorted((root / "noisy" / "train").glob("*.tar")):
        for key, m in iter_tar_samples(path.read_bytes()):
            truth[key] = json.loads(m["json"])["mismatched"]
    q = pq.read_table(out / "quarantine").to_pylist()
    removed = {r["key"] for r in q if r["reason"] == "low_clip_score"}
    mismatched = {k for k, v in truth.items() if v}
    tp = len(removed & mismatched)
    precision = tp / max(len(removed), 1)
    recall = tp / max(len(mismatched), 1)
    print(
        f"\nCLIP filter at threshold {threshold:.4f}: removed {len(removed)} of {len(truth)}, "
        f"{len(mismatched)} mismatched; precision {precision:.3f} recall {recall:.3f}"
    )
    assert precision >= 0.7 and recall >= 0.7
    assert manifest["reasons"] == {"low_clip_score": len(removed)}

    stats = json.loads((out / "stats.json").read_text())
    assert stats["clip"]["scored"] == len(truth) and stats["clip"]["threshold"] == threshold
    assert stats["clip"]["quantiles"]["p05"] < stats["clip"]["quantiles"]["p95"]
    # Kept samples carry their score, above the threshold.
    sample = iter_tar_samples((out / "shards" / "shard-00000.tar").read_bytes())
    meta = json.loads(next(iter(sample))[1]["json"])
    assert meta["clip_score"] >= threshold
