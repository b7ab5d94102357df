"""Aspect-ratio buckets and random flips for the latent recipe (#27): bucket assignment from its
definition, `t2i tokenize recipe=ldm buckets=true flip=true` on real photos at mixed aspect
ratios (each row the autoencoder's latent of its bucket's crop and of the mirrored crop), the
per-rank regrouping, and one 2-worker kill + resume over the bucketed, flipped dataset."""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline import token_dataset as T
from data_pipeline.tokenize.buckets import assign_bucket, compute_buckets
from trainer.objectives.ldm_buckets import compute_bucket_steps, regroup_buckets

REPO = Path(__file__).resolve().parents[2]
SIZE, STEP = 32, 8  # 32-px squares, bucket sides multiples of 8 (latent sides of 2)


def test_buckets_follow_their_definition():
    # SD-scale example, worked by hand: W=192 -> H=floor(65536/192/64)*64=320 (ratio 1.67);
    # W=128 -> H=512 (ratio 4) and W=384 -> H=128 (ratio 3) are too elongated for max_ratio=2.
    assert set(compute_buckets(256, 64, 2.0)) == {(320, 192), (256, 256), (192, 320)}
    for size, step, ratio in ((32, 8, 2.0), (256, 64, 2.0), (512, 64, 1.5), (512, 32, 4.0)):
        got = set(compute_buckets(size, step, ratio))
        sides = range(step, size * size // step + 1, step)
        # definition: the square, and every (h, w) that fits the area and the ratio with no room
        # for a taller h (one more step would not fit), with its transpose
        want = {(size, size)}
        for h, w in itertools.product(sides, sides):
            if h * w <= size * size < (h + step) * w and max(h, w) <= ratio * min(h, w):
                want |= {(h, w), (w, h)}
        assert got == want, (size, step, ratio)
    rng = np.random.default_rng(0)
    buckets = compute_buckets(512, 64, 2.0)
    for w, h in rng.integers(50, 3000, size=(200, 2)):
        i = assign_bucket(int(w), int(h), buckets)
        dist = [abs(math.log(bw / bh) - math.log(w / h)) for bh, bw in buckets]
        assert dist[i] == min(dist)
    assert buckets[assign_bucket(300, 200, buckets)] == (384, 640)  # landscape 1.5 -> 1.67
    assert buckets[assign_bucket(200, 300, buckets)] == (640, 384)
    assert buckets[assign_bucket(999, 1000, buckets)] == (512, 512)
    with pytest.raises(ValueError, match="bucket_step"):
        compute_buckets(256, 48, 2.0)


def test_regrouping_gives_one_shape_per_batch_equal_counts_and_exact_skips():
    b, channels, buckets = 4, 2, [(2, 4), (4, 4), (4, 2)]
    width = channels * 16

    def stream(seed, rows):  # mixed batches as iter_torch_batches gives them (drop_last)
        g = torch.Generator().manual_seed(seed)
        which = torch.randint(0, len(buckets), (rows,), generator=g)
        for s in range(0, rows - rows % b, b):
            hw = torch.tensor([buckets[k] for k in which[s : s + b]])
            latent = torch.zeros(b, width)
            for j, (h, w) in enumerate(hw.tolist()):
                latent[j, : channels * h * w] = s + j + 1  # row id, in the row's own values
            yield {T.LATENT: latent, T.LATENT_H: hw[:, 0], T.LATENT_W: hw[:, 1]}

    rows, world = 50, 2
    steps = compute_bucket_steps(rows, world, b, len(buckets))
    assert steps == math.ceil((24 - 3 * 3) / 4) == 4  # 25 rows per rank, 24 fed, 9 may stay
    for seed in range(30):  # every rank's stream, however its buckets fall, gives `steps`
        out = list(regroup_buckets(stream(seed, rows // world), b, steps, channels))
        assert len(out) == steps
        ids = []
        for batch in out:
            h, w = batch[T.LATENT].shape[2:]
            assert batch[T.LATENT].shape == (b, channels, h, w)
            assert (batch[T.LATENT_H] == h).all() and (batch[T.LATENT_W] == w).all()
            ids += batch[T.LATENT][:, 0, 0, 0].tolist()
        assert len(set(ids)) == len(ids)  # no row twice
        again = list(regroup_buckets(stream(seed, rows // world), b, steps, channels))
        assert all(torch.equal(x[T.LATENT], y[T.LATENT]) for x, y in zip(out, again, strict=True))
    with pytest.raises(RuntimeError, match="ended after"):
        list(regroup_buckets(stream(0, 8), b, 3, channels))

    # The loop skips a resumed epoch's consumed batches AFTER regrouping: the rest is the tail
    from trainer import checkpoint as ck
    from trainer.config import TrainConfig
    from trainer.loop import iter_epoch

    class Shard:  # one rank's mixed batches (what Ray Data's iter_torch_batches yields)
        def iter_torch_batches(self, **kw):
            return stream(7, rows // world)

    def regroup(batches):
        return regroup_buckets(batches, b, steps, channels)

    cfg = TrainConfig(name="x")
    full = list(iter_epoch(Shard(), cfg, ck.TrainState(), regroup))
    tail = list(iter_epoch(Shard(), cfg, ck.TrainState(batches_in_epoch=3), regroup))
    assert len(full) == steps and len(tail) == steps - 3
    assert all(torch.equal(x[T.LATENT], y[T.LATENT]) for x, y in zip(full[3:], tail, strict=True))


def test_bucket_and_flip_keys_are_checked():
    from data_pipeline.config import ConfigError, load_config
    from data_pipeline.tokenize.config import TokenizeConfig, check_config

    base = ["input=x", "output=y", "image_tokenizer.path=z"]
    for bad, match in ((["flip=true"], "recipe=ldm"), (["buckets=true"], "recipe=ldm"),
                       (["recipe=ldm", "text_encoder.allow_random=true",
                         "text_tokenizer.kind=open_clip", "buckets=true", "bucket_step=48"],
                        "bucket_step=48 must be >= 1 and divide image_size=256")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            check_config(load_config(TokenizeConfig, None, base + bad))


@pytest.fixture(scope="module")
def photo_latents(ray_local, tmp_path_factory):
    """40 real photo crops (img2dataset layout) at aspect ratios 0.6-1.67, tokenized with
    buckets and flips: 32-px area, the tiny KL-AE (f4), the tiny open_clip text tower."""
    from data_pipeline.config import load_config
    from data_pipeline.photos import PhotosConfig, build_photos
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize
    from tests.trainer.sample_fixtures import LDM_TEXT_LEN, TEXT_ENCODER, make_klae

    root = tmp_path_factory.mktemp("ldm-buckets")
    photos = PhotosConfig(out=str(root / "photos"), samples=40, samples_per_shard=20,
                          min_side=24, max_side=64)  # fmt: skip
    build_photos(photos, log=lambda *_: None)
    (root / "tiny_clip.json").write_text(json.dumps(TEXT_ENCODER))
    klae = make_klae(root / "klae")
    cfg = load_config(TokenizeConfig, None, [
        f"input={root / 'photos'}", f"output={root / 'latents'}", "recipe=ldm",
        f"image_size={SIZE}", "buckets=true", f"bucket_step={STEP}", "flip=true",
        "text_tokenizer.kind=open_clip", f"text_tokenizer.text_len={LDM_TEXT_LEN}",
        f"image_tokenizer.path={klae}", "image_tokenizer.batch_size=8",
        "text_encoder.model=tiny_clip", f"text_encoder.model_config={root / 'tiny_clip.json'}",
        "text_encoder.batch_size=8", "text_encoder.allow_random=true",
    ])  # fmt: skip
    manifest = run_tokenize(cfg, log=lambda *_: None)
    return root, photos, klae, manifest


def test_tokenize_buckets_and_flips_store_the_autoencoders_latents(photo_latents):
    from PIL import Image

    from data_pipeline.photos import photo_samples
    from data_pipeline.validate import resize_cover_crop
    from trainer.pretrained.image_tokenizers import load_image_tokenizer

    root, photos, klae, manifest = photo_latents
    assert manifest["rows"] == 40 and manifest["flip"] is True
    assert manifest["latent_shape"] == [4, 8, 8]  # the square: every bucket fits its buffer
    shapes = manifest["buckets"]["shapes"]
    assert [s["size"] for s in shapes] == [[40, 24], [32, 32], [24, 40]]
    assert [s["latent_shape"] for s in shapes] == [[4, 10, 6], [4, 8, 8], [4, 6, 10]]
    assert sum(s["rows"] for s in shapes) == 40 and all(s["rows"] > 0 for s in shapes)
    table = pa.concat_tables([pq.read_table(root / "latents" / s["path"])
                              for s in manifest["shards"]])  # fmt: skip
    assert table.column_names == manifest["columns"]
    rows = {r["key"]: r for r in table.to_pylist()}
    tok = load_image_tokenizer(str(klae))
    sizes = [tuple(s["size"]) for s in shapes]
    for key, members, _ in photo_samples(photos):
        img = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
        h, w = sizes[assign_bucket(img.width, img.height, sizes)]  # from the definition
        row = rows[key]
        assert (row["latent_h"], row["latent_w"]) == (h // 4, w // 4), key
        crop = resize_cover_crop(img, h, w)  # (h, w, 3)
        for column, pixels in ((T.LATENT, crop), (T.LATENT_FLIP, crop[:, ::-1])):
            x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
            with torch.inference_mode():
                want = tok.encode(x)[0].numpy()  # (4, h/4, w/4)
            got = np.asarray(row[column], np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=0, atol=5e-3, err_msg=f"{key} {column}")


def _fit(tmp_path, name, data, *overrides):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig
    from trainer.launch import fit

    cfg = load_config(
        TrainConfig,
        REPO / "jobs/configs/ldm_tiny.yaml",
        [f"name={name}", f"checkpoint.storage_path={tmp_path}", "engine.precision=fp32",
         "steps=6", "log_every=6", "checkpoint.every_steps=4", "checkpoint.keep=0",
         "data.source=tokens", f"data.path={data}", "data.batch_size=4",
         "data.local_shuffle_buffer=8", "ldm.random_flip=0.5", "ldm.sample_steps=2",
         "failure_max_retries=0", *overrides],
    )  # fmt: skip
    result = fit(cfg)
    assert result.error is None, result.error
    return tmp_path / name


@pytest.mark.slow
def test_bucketed_flipped_training_on_two_ranks_resumes_exactly(photo_latents, tmp_path):
    """2 workers x batch 4 over 40 rows in 3 buckets: 3 one-bucket batches per rank per epoch
    (pigeonhole), so 6 steps cross an epoch; a worker killed after step 5 resumes from the
    step-4 checkpoint (epoch 2, one regrouped batch consumed) to bit-identical weights."""
    from safetensors.torch import load_file

    from data_pipeline.config import ConfigError, load_config
    from trainer.config import TrainConfig
    from trainer.objectives.ldm import LdmObjective

    root, _, _, manifest = photo_latents
    data = root / "latents"
    assert compute_bucket_steps(40, 2, 4, 3) == 3
    clean = _fit(tmp_path, "clean", data)
    killed = _fit(tmp_path, "killed", data, "faults.kill_at_steps=[5]",
                  f"faults.marker_dir={tmp_path}/marks", "failure_max_retries=1")  # fmt: skip
    assert (tmp_path / "marks").exists()
    final = "checkpoints/step_00000006/model.safetensors"
    a, b = load_file(str(clean / final)), load_file(str(killed / final))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the logged grid sampled at the batch's own bucket shape and decoded
    assert (clean / "images/samples_step00000006.png").exists()

    # random_flip on a dataset without mirrored latents: refused, naming dataset and key
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(data / "manifest.json", plain / "manifest.json")
    m = json.loads((plain / "manifest.json").read_text())
    (plain / "manifest.json").write_text(json.dumps({**m, "flip": False}))
    cfg = load_config(TrainConfig, REPO / "jobs/configs/ldm_tiny.yaml", [
        "name=x", "data.source=tokens", f"data.path={plain}", "ldm.random_flip=0.5"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"plain.*flip=true"):
        LdmObjective(cfg).dataset()
