import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline import fs
from data_pipeline.digits import (
    DIGIT_WORDS,
    HELDOUT_TEMPLATES,
    DigitsConfig,
    build_digits,
    digit_to_image,
    split_indices,
)
from data_pipeline.shards import iter_tar_samples, split_member_name


def read_samples(path):
    with open(path, "rb") as f:
        return list(iter_tar_samples(f.read()))


def member_names(path):
    import tarfile

    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = DigitsConfig(out=str(out), samples_per_shard=200, mismatch_fraction=0.2, photos=10)
    return out, build_digits(cfg, log=lambda *_: None)


def test_counts_split_and_manifest(built):
    out, manifest = built
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["samples"] + val["samples"] == 1797
    assert val["samples"] == round(1797 * 0.1)
    assert len(train["shards"]) == -(-train["samples"] // 200)
    for split in ("train", "val", "photos"):
        info = manifest["splits"][split]
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
        for shard in info["shards"]:
            data = (out / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert len(read_samples(out / shard["path"])) == shard["samples"]


def test_keys_unique_and_members_contiguous(built):
    out, manifest = built
    all_keys = []
    for split in ("train", "val", "photos"):
        for shard in manifest["splits"][split]["shards"]:
            keys = [split_member_name(n)[0] for n in member_names(out / shard["path"])]
            runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
            assert len(runs) == len(set(runs)), "a key's members are split"
            all_keys += runs
            for key, members in read_samples(out / shard["path"]):
                assert set(members) == {"png", "txt", "json"}, key
    assert len(all_keys) == len(set(all_keys)) == 1797 + 10


def test_captions_labels_and_mismatches(built):
    out, manifest = built
    n_mis = n = 0
    for shard in manifest["splits"]["train"]["shards"]:
        for _key, m in read_samples(out / shard["path"]):
            meta = json.loads(m["json"])
            caption = m["txt"].decode()
            n += 1
            label = meta["caption_label"]
            assert DIGIT_WORDS[label] in caption or str(label) in caption
            assert meta["mismatched"] == (meta["label"] != meta["caption_label"])
            n_mis += meta["mismatched"]
            img = Image.open(__import__("io").BytesIO(m["png"]))
            assert img.size == (32, 32) and img.mode == "RGB"
            for t in HELDOUT_TEMPLATES:  # held-out phrasings never appear in the data
                assert caption != t.format(w=DIGIT_WORDS[label], d=label)
    assert abs(n_mis / n - 0.2) < 0.04


def test_pixel_mapping_and_polarity():
    px = np.zeros((8, 8))
    px[2:6, 3:5] = 16  # a bar of full ink
    arr = np.asarray(digit_to_image(px, 8))
    assert arr.shape == (8, 8, 3)
    assert arr[3, 3, 0] == 255 and arr[0, 0, 0] == 0  # ink white, paper black
    assert np.asarray(digit_to_image(np.full((8, 8), 8.0), 8))[0, 0, 0] == 128
    with pytest.raises(ValueError, match="8x8"):
        digit_to_image(np.zeros((4, 4)), 8)


def test_split_is_deterministic_and_disjoint():
    a_tr, a_va = split_indices(100, 0.2, seed=3)
    b_tr, b_va = split_indices(100, 0.2, seed=3)
    assert (a_tr == b_tr).all() and (a_va == b_va).all()
    assert len(set(a_tr) & set(a_va)) == 0 and len(a_tr) + len(a_va) == 100
    assert not (split_indices(100, 0.2, seed=4)[1] == a_va).all()


def test_two_runs_are_byte_identical(tmp_path):
    digests = []
    for run in ("a", "b"):
        cfg = DigitsConfig(out=str(tmp_path / run), mismatch_fraction=0.1, photos=4, image_size=16)
        build_digits(cfg, log=lambda *_: None)
        files = sorted(p for p in (tmp_path / run).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / run)): p.read_bytes() for p in files})
    assert digests[0].keys() == digests[1].keys()
    assert len(digests[0]) >= 4  # train, val, photos shards + manifest
    assert digests[0] == digests[1]


def test_s3_round_trip(s3_bucket, tmp_path):
    """Build to S3 on the moto server, read back through the same resolver, compare with local."""
    uri = f"s3://{s3_bucket}/datasets/digits"
    cfg = DigitsConfig(out=uri, photos=3, image_size=8, samples_per_shard=500)
    manifest = build_digits(cfg, log=lambda *_: None)
    base = fs.resolve(uri)
    names = [p[len(base.path) + 1 :] for p in fs.list_files(base)]
    assert "manifest.json" in names
    assert sorted(n for n in names if n.endswith(".tar")) == sorted(
        s["path"] for split in manifest["splits"].values() for s in split["shards"]
    )
    local = DigitsConfig(out=str(tmp_path / "local"), photos=3, image_size=8, samples_per_shard=500)
    build_digits(local, log=lambda *_: None)
    for name in names:
        assert fs.read_bytes(base.join(name)) == (tmp_path / "local" / name).read_bytes(), name
