"""`make demo`: the main job end to end on the embedded default (local Ray, bundled real data).

Every stage writes under one run directory and is skipped when its output manifest already exists,
so a second `make demo` reuses finished work. Stages not yet built are listed, not faked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_pipeline import fs
from data_pipeline.digits import MANIFEST_FORMAT, MANIFEST_VERSION
from data_pipeline.manifest import ManifestError, read_manifest
from trainer.config import DigitsConfig

PENDING = ("preprocess", "train tokenizer", "tokenize", "train transformer", "sample", "eval")


def stage(name: str, out: Path, build) -> dict:
    """Run `build()` unless `out` already holds a complete (manifested) result."""
    loc = fs.resolve(str(out))
    try:
        manifest = read_manifest(loc, MANIFEST_FORMAT, (MANIFEST_VERSION,))
        print(f"[demo] {name}: reusing {out}")
        return manifest
    except ManifestError:
        pass
    print(f"[demo] {name}: building {out}")
    t0 = time.monotonic()
    manifest = build()
    print(f"[demo] {name}: done in {time.monotonic() - t0:.1f}s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo", help="everything the demo writes")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()

    from data_pipeline.digits import build_digits

    # 10% of captions name the wrong digit: the CLIP filter (preprocess stage) must find them.
    digits_cfg = DigitsConfig(out=str(run_dir / "digits"), mismatch_fraction=0.1)
    manifest = stage("data digits", run_dir / "digits", lambda: build_digits(digits_cfg))
    for split, info in manifest["splits"].items():
        print(f"[demo]   {split:7s} {info['samples']:5d} samples in {len(info['shards'])} shard(s)")
    print(f"[demo] shards are in {run_dir / 'digits'}")
    print(f"[demo] not built yet in this release: {', '.join(PENDING)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
