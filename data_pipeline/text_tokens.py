"""Caption and prompt tokenization: one `TextTokenizer` for `t2i tokenize` and `t2i sample`.

    tok = TextTokenizer.train(captions, vocab_size=1024, text_len=16)   # byte-level BPE
    ids = tok.encode(["a photo of the digit seven"])                   # (1, 16) int32
    tok.save("tokens/text_tokenizer.json")

    tok = load_text_tokenizer("runs/demo/tokens")   # the one a token dataset was written with

Two kinds:
- `bpe`: a byte-level BPE trained with Hugging Face `tokenizers` on the dataset's captions. Small
  vocabularies (DALL-E-style models on small data) fit the captions much better than a generic one.
  Id 0 is `<pad>`; byte-level means every string encodes (no unknown token).
- `open_clip`: open_clip's bundled BPE (49408 ids, start/end-of-text tokens), for models whose
  text side must agree with a CLIP text tower (the LDM recipe's text encoder).

Every encoding is (N, text_len) int32, truncated to `text_len` and right-padded with `pad_id` (0),
which the DALL-E model replaces by its per-position pad tokens; ids lie in [0, vocab_size).

A tokenizer file is one canonical JSON document (our header + the `tokenizers` JSON), so its sha256
(`fingerprint`) identifies it: a sampler can check that it tokenizes prompts exactly as the
training data was tokenized.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from data_pipeline import fs

FORMAT = "ray-t2i/text-tokenizer"
VERSION = 1
KINDS = ("bpe", "open_clip", "clip_folder")
# clip_folder: a transformers CLIPTokenizer folder (a Stable Diffusion pipeline's `tokenizer/`),
# its files kept inside the tokenizer document; it pads with its own pad token to text_len.
CLIP_FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.json")  # fmt: skip
PAD_ID = 0
PAD_TOKEN = "<pad>"
MANIFEST_KEY = "text_tokenizer"  # dataset manifests: {"file": relative path, "fingerprint": ...}


class CaptionSample:
    """A uniform sample of at most `k` captions from a stream of any length, in O(k) memory:
    the `k` whose ids hash lowest (bottom-k). The sample depends only on the set of (id, caption)
    pairs, not on their order, so Ray tasks may deliver them in any order and samples of parts
    merge (`merge`) into the sample of the whole: a rerun trains the same BPE."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"text_tokenizer.train_captions must be >= 1, got {k}")
        self.k = k
        self.seen = 0  # captions offered
        self._heap: list[tuple[int, tuple, str]] = []  # (-hash, id, caption): max-heap on hash

    @staticmethod
    def rank(ident: tuple) -> int:
        return int.from_bytes(hashlib.sha256(repr(ident).encode()).digest()[:7], "big")  # int64

    def add(self, ident: tuple, caption: str, rank: int | None = None) -> None:
        import heapq

        self.seen += 1
        item = (-(self.rank(ident) if rank is None else rank), ident, caption)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:  # a lower hash than the highest kept
            heapq.heapreplace(self._heap, item)

    def items(self) -> list[tuple[int, tuple, str]]:
        """(hash, id, caption) of the kept captions (for `merge` across processes)."""
        return [(-h, ident, c) for h, ident, c in self._heap]

    def captions(self) -> list[str]:
        """The kept captions in id order (a deterministic training order)."""
        return [c for _, _, c in sorted(self._heap, key=lambda t: t[1])]

    def __len__(self) -> int:
        return len(self._heap)


class TextTokenizer:
    """Fixed-length caption encoder. Build with `train`, `open_clip` or `load`, not directly."""

    def __init__(self, doc: dict[str, Any]):
        _check_doc(doc, "text tokenizer")
        self.kind: str = doc["kind"]
        self.vocab_size: int = int(doc["vocab_size"])  # ids lie in [0, vocab_size)
        self.text_len: int = int(doc["text_len"])  # every encoding has this many ids
        self.pad_id: int = int(doc["pad_id"])
        self._doc = doc
        self._bytes = _canonical(doc)
        self.fingerprint: str = hashlib.sha256(self._bytes).hexdigest()
        if self.kind == "bpe":
            from tokenizers import Tokenizer

            self._bpe = Tokenizer.from_str(json.dumps(doc["tokenizer"]))
            self._bpe.no_padding()
            self._bpe.no_truncation()
            if self._bpe.get_vocab_size() > self.vocab_size:
                raise ValueError(
                    f"text tokenizer: BPE has {self._bpe.get_vocab_size()} ids but vocab_size is "
                    f"{self.vocab_size}"
                )
        elif self.kind == "clip_folder":
            self._hf = _clip_folder_tokenizer(doc["files"])
        else:
            from open_clip.tokenizer import SimpleTokenizer

            self._clip = SimpleTokenizer(context_length=self.text_len)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, text_len: int, *, lowercase: bool = True
    ) -> TextTokenizer:
        """Train a byte-level BPE on `captions` (deterministic: same captions, same tokenizer).

        `vocab_size` is the model's text vocabulary: the BPE learns at most that many ids (fewer
        when the captions run out of pairs to merge), so every id fits the embedding table.
        """
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < 258:  # pad + 256 byte symbols + at least one merge
            raise ValueError(f"text_tokenizer.vocab_size must be >= 258, got {vocab_size}")
        if text_len < 1:
            raise ValueError(f"text_tokenizer.text_len must be >= 1, got {text_len}")
        bpe = Tokenizer(models.BPE())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        bpe.normalizer = normalizers.Sequence(steps)
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[PAD_TOKEN],  # first special token gets id 0 = PAD_ID
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator([str(c) for c in captions], trainer=trainer)
        if bpe.token_to_id(PAD_TOKEN) != PAD_ID:
            raise RuntimeError(f"BPE training put {PAD_TOKEN} at {bpe.token_to_id(PAD_TOKEN)}")
        return cls(_doc("bpe", vocab_size, text_len, tokenizer=json.loads(bpe.to_str())))

    @classmethod
    def open_clip(cls, text_len: int) -> TextTokenizer:
        """open_clip's bundled BPE; the fingerprint covers its vocabulary file."""
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        with open(default_bpe(), "rb") as f:
            vocab_sha = hashlib.sha256(f.read()).hexdigest()
        vocab = len(SimpleTokenizer().encoder)
        return cls(_doc("open_clip", vocab, text_len, bpe_sha256=vocab_sha))

    @classmethod
    def clip_folder(cls, folder: str) -> TextTokenizer:
        """A local CLIPTokenizer folder (SD's `tokenizer/`): text_len is its model_max_length,
        pad_id its pad token; the fingerprint covers every file of it we keep."""
        import os

        files = {}
        for name in CLIP_FOLDER_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    files[name] = f.read()
        if "vocab.json" not in files and "tokenizer.json" not in files:
            raise FileNotFoundError(
                f"{os.path.join(folder, 'vocab.json')}: missing (a CLIPTokenizer folder holds "
                f"vocab.json + merges.txt or tokenizer.json)"
            )
        hf = _clip_folder_tokenizer(files)
        doc = _doc("clip_folder", len(hf), int(hf.model_max_length), files=files)
        doc["pad_id"] = int(hf.pad_token_id)
        return cls(doc)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "text tokenizer") -> TextTokenizer:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: not valid JSON: {e}") from e
        _check_doc(doc, source)
        return cls(doc)

    @classmethod
    def load(cls, path: str | fs.Location) -> TextTokenizer:
        """Read a tokenizer file written by `save` (local path, or a resolved Location)."""
        loc = fs.resolve(path) if isinstance(path, str) else path
        return cls.from_bytes(fs.read_bytes(loc), loc.uri)

    def to_bytes(self) -> bytes:
        return self._bytes

    def save(self, path: str | fs.Location) -> None:
        """Write the tokenizer file atomically (its bytes hash to `fingerprint`)."""
        loc = fs.resolve(path) if isinstance(path, str) else path
        fs.write_bytes_atomic(loc, self._bytes)

    # --- use --------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, text_len) int32 ids: truncated to text_len, right-padded with pad_id."""
        texts = [str(t) for t in texts]
        out = np.full((len(texts), self.text_len), self.pad_id, dtype=np.int32)
        if not texts:
            return out
        if self.kind == "bpe":
            for i, enc in enumerate(self._bpe.encode_batch(texts, add_special_tokens=False)):
                ids = enc.ids[: self.text_len]
                out[i, : len(ids)] = ids
        elif self.kind == "clip_folder":  # as SD pipelines call it
            enc = self._hf(texts, padding="max_length", max_length=self.text_len, truncation=True)
            out[:] = np.asarray(enc["input_ids"], dtype=np.int32)
        else:  # open_clip: <start> ... <end>, truncated with <end> kept last, 0-padded
            out[:] = self._clip(texts, context_length=self.text_len).numpy()
        return out

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (open_clip: with its start/end tokens); above `text_len`,
        `encode` truncates the text."""
        texts = [str(t) for t in texts]
        if self.kind == "bpe":
            return [len(e.ids) for e in self._bpe.encode_batch(texts, add_special_tokens=False)]
        if self.kind == "clip_folder":
            return [len(ids) for ids in self._hf(texts)["input_ids"]]
        return [len(self._clip.encode(t)) + 2 for t in texts]

    def truncation_warnings(self, texts: Sequence[str]) -> list[str]:
        """One line per text that `encode` truncates, naming it and what survives."""
        lines = []
        for text, n in zip(texts, self.lengths(texts), strict=True):
            if n > self.text_len:
                kept = self.decode(self.encode([text]))[0]
                lines.append(
                    f"{text!r} is {n} tokens, text_len is {self.text_len}: the model sees {kept!r}"
                )
        return lines

    def decode(self, ids: np.ndarray) -> list[str]:
        """Captions back from (N, L) ids, pads (and open_clip's start/end tokens) dropped."""
        rows = np.atleast_2d(np.asarray(ids))
        if self.kind == "bpe":
            return self._bpe.decode_batch([[int(i) for i in r if i != self.pad_id] for r in rows])
        if self.kind == "clip_folder":
            return [s.strip() for s in self._hf.batch_decode(rows, skip_special_tokens=True)]
        special = set(self._clip.all_special_ids) | {self.pad_id}
        return [self._clip.decode([int(i) for i in r if i not in special]).strip() for r in rows]

    def describe(self) -> dict[str, Any]:
        """What a dataset manifest records (besides the file it is stored in)."""
        return {
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "text_len": self.text_len,
            "pad_id": self.pad_id,
        }

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"text_len={self.text_len}, fingerprint={self.fingerprint[:12]})"
        )


def _doc(kind: str, vocab_size: int, text_len: int, **extra) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "vocab_size": int(vocab_size),
        "text_len": int(text_len),
        "pad_id": PAD_ID,
        **extra,
    }


def _canonical(doc: dict[str, Any]) -> bytes:
    # Sorted keys, no whitespace variance: equal tokenizers give equal bytes and fingerprints.
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _check_doc(doc: Any, source: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{source}: format is {got!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise ValueError(
            f"{source}: {FORMAT} version {doc.get('version')!r} is not one this release reads "
            f"({VERSION})"
        )
    if doc.get("kind") not in KINDS:
        raise ValueError(f"{source}: kind {doc.get('kind')!r} is not one of {', '.join(KINDS)}")
    for key in ("vocab_size", "text_len", "pad_id"):
        if not isinstance(doc.get(key), int):
            raise ValueError(f"{source}: {key} must be an integer, got {doc.get(key)!r}")
    if doc["kind"] == "bpe" and not isinstance(doc.get("tokenizer"), dict):
        raise ValueError(f"{source}: a bpe tokenizer needs its `tokenizer` JSON object")
    if doc["kind"] == "clip_folder" and not isinstance(doc.get("files"), dict):
        raise ValueError(f"{source}: a clip_folder tokenizer needs its `files` object")


def _clip_folder_tokenizer(files: dict[str, str]):
    """A transformers CLIPTokenizer from a folder's files (written to a temporary folder)."""
    import os
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="t2i-clip-tok-") as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def load_text_tokenizer(dataset_uri: str, storage: Any = None) -> TextTokenizer:
    """The text tokenizer a token or latent dataset was written with, found via its manifest.

    `storage` is the job's `StorageConfig` (endpoint, region, retries, timeouts) for s3:// datasets.
    The file's sha256 must match the fingerprint the manifest recorded.
    """
    from data_pipeline.token_dataset import read_any_manifest

    base = fs.resolve(dataset_uri, storage=storage)
    manifest = read_any_manifest(base)
    entry = manifest.get(MANIFEST_KEY)
    if not isinstance(entry, dict) or "file" not in entry:
        raise ValueError(f"{base.uri}/manifest.json: no {MANIFEST_KEY}.file entry")
    loc = base.join(entry["file"])
    tok = TextTokenizer.from_bytes(fs.read_bytes(loc), loc.uri)
    if tok.fingerprint != entry.get("fingerprint"):
        raise ValueError(
            f"{loc.uri}: sha256 {tok.fingerprint} differs from the manifest's "
            f"{MANIFEST_KEY}.fingerprint {entry.get('fingerprint')!r} (file replaced?)"
        )
    return tok
