"""Builders of hostile and clean WebDataset shards for the preprocess tests (raw `tarfile`, so
the shards can be as broken as real ones)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png(seed: int, w: int = 32, h: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int = 3000) -> bytes:
    """A small file declaring side*side pixels (all black compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


class _Evil:
    """Unpickling this creates `path`: proof that something deserialized a member."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def write_tar(path: Path, members: list[tuple[str, bytes]], *, symlinks=()) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name in symlinks:
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample(key: str, seed: int, caption: str = "a photo", **kw) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png(seed, **kw)), (f"{key}.txt", caption.encode())]


def build_hostile(root: Path, pickle_sentinel: Path) -> dict:
    """Four shards covering every bad case; returns the expected outcome."""
    root.mkdir(parents=True, exist_ok=True)
    npy_obj, npy_ok = io.BytesIO(), io.BytesIO()
    np.save(npy_obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(npy_ok, np.arange(4, dtype=np.float32))
    a = [
        *sample("good0", 0),
        *sample("good1", 1),
        ("bad_image.png", b"\x89PNG\r\n\x1a\n garbage"),
        ("bad_image.txt", b"a photo"),
        ("bomb.png", bomb_png()),
        ("bomb.txt", b"a photo"),
        ("split.png", png(3)),
        *sample("good2", 2),
        ("split.txt", b"a photo"),
        *sample("dupkey", 4),
        *sample("dupkey", 5),
        ("nocap.png", png(6)),
        ("noimg.txt", b"a photo"),
        ("empty.png", png(7)),
        ("empty.txt", b"   "),
        ("latin1.png", png(8)),
        ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("long.png", png(9)),
        ("long.txt", b"a" * 5000),
        *sample("pickled", 10),
        ("pickled.pkl", pickle.dumps(_Evil(str(pickle_sentinel)))),
        *sample("objnpy", 11),
        ("objnpy.npy", npy_obj.getvalue()),
        *sample("oknpy", 12),
        ("oknpy.npy", npy_ok.getvalue()),
        ("../escape.png", png(13)),
        ("../escape.txt", b"a photo"),
        ("link.png", b""),
        ("link.txt", b"a photo"),
        ("huge.png", png(14, 200, 200)),
        ("huge.txt", b"a photo"),
    ]
    write_tar(root / "a.tar", a, symlinks={"link.png"})
    b = [
        *sample("good3", 15),
        *sample("small", 16, w=16, h=16),
        *sample("wide", 17, w=96, h=24),
        *sample("wordy", 18, caption=" ".join(["word"] * 30)),
        *sample("zcopy0", 0),  # same pixels as a.tar's good0, larger key: dropped
    ]
    write_tar(root / "b.tar", b)
    # c.tar: three good samples, then the stream is cut inside the fourth sample's image.
    write_tar(root / "c_full.tar", [*sample("c0", 20), *sample("c1", 21), *sample("c2", 22),
                                    *sample("c3", 23)])  # fmt: skip
    full = (root / "c_full.tar").read_bytes()
    (root / "c_full.tar").unlink()
    cut = full.index(b"c3.png") + 512 + 40  # header of c3.png, then 40 bytes of its data
    (root / "c.tar").write_bytes(full[:cut])
    (root / "d.tar").write_bytes(b"this is not a tar file at all" * 40)
    return {
        "kept": sorted(["good0", "good1", "good2", "dupkey", "oknpy", "good3", "c0", "c1", "c2"]),
        "reasons": {
            "undecodable_image": 1,
            "decompression_bomb": 1,
            "noncontiguous_key": 1,
            "duplicate_key": 1,
            "missing_caption": 1,
            "missing_image": 1,
            "empty_caption": 1,
            "caption_not_utf8": 1,
            "caption_too_long": 1,
            "unsafe_member": 2,
            "invalid_key": 1,
            "not_a_file": 1,
            "member_too_large": 1,
            "too_small": 1,
            "bad_aspect_ratio": 1,
            "caption_length": 1,
            "duplicate_exact": 1,
            "corrupt_tar": 2,
        },
    }


def build_clean(root: Path, shards: int = 5, per_shard: int = 12) -> None:
    """Plain valid shards with a few exact duplicates across shards (dedup has work to do)."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "tree", "car", "boat", "house"]
    for s in range(shards):
        members = []
        for j in range(per_shard):
            seed = 1000 + s * per_shard + j
            if j == 0 and s > 0:
                seed = 1000  # every shard's first image repeats shard 0's first one
            caption = f"a photo of a {words[(s + j) % len(words)]}"
            members += sample(f"s{s}k{j:03d}", seed, caption=caption)
        write_tar(root / f"part-{s:03d}.tar", members)
