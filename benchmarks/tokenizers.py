"""Image tokenizers side by side: reconstruction PSNR on held-out digits and on real photos.

    .venv/bin/python -m benchmarks.tokenizers \\
        --tokenizer dvae=runs/demo/train/dvae-digits \\
        --tokenizer vqgan=runs/demo/train/vqgan-digits \\
        --tokenizer klae=runs/demo/train/klae-digits \\
        --digits runs/demo/digits

Each `--tokenizer NAME=PATH` is anything `load_image_tokenizer` takes (a `t2i train` run, a
checkpoint, a `t2i convert` output, a diffusers AutoencoderKL directory; local or s3://). The
digits directory is `t2i data digits` output: `val/` (held-out digits) and `photos/` (real photo
crops, resized to a multiple of each tokenizer's downsampling factor).

Columns: downsampling f, the code grid for a digit, codes per image (the code budget: grid cells
for dVAE/VQGAN, latent values C*h*w for the KL-AE), vocabulary (codebook size or "continuous"),
bits per image for discrete tokenizers (cells * log2 K), and mean per-image PSNR in dB
(`trainer.recon`). Comparing discrete tokenizers is fair only at the same code budget; a warning
is printed when they differ.

The last line printed is one JSON object, {NAME: {"kind", "downsample", "codes_per_image",
"vocab_size", "bits_per_image", "psnr_val", "psnr_photos"}, ...} (null where not applicable).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from trainer.models.image_tokenizer import ImageTokenizer
from trainer.pretrained.image_tokenizers import load_image_tokenizer
from trainer.recon import load_split_images, reconstruction_psnr


def parse_tokenizers(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--tokenizer must look like NAME=PATH, got {item!r}")
        if name in out:
            raise SystemExit(f"--tokenizer name {name!r} given twice")
        out[name] = path
    return out


def code_budget(tok: ImageTokenizer, image_size: int) -> dict:
    """What a tokenizer spends on one square image of `image_size` pixels."""
    grid = tok.grid(image_size)
    if tok.discrete:
        codes = grid * grid
        return {
            "grid": grid,
            "codes_per_image": codes,
            "vocab_size": tok.vocab_size,
            "bits_per_image": codes * math.log2(tok.vocab_size),
        }
    return {
        "grid": grid,
        "codes_per_image": tok.latent_channels * grid * grid,
        "vocab_size": None,
        "bits_per_image": None,
    }


def measure(name: str, path: str, digits: str, *, limit: int, batch_size: int, device: str) -> dict:
    t0 = time.perf_counter()
    tok = load_image_tokenizer(path, device=device)
    val = load_split_images(digits, "val", multiple_of=tok.downsample, limit=limit)
    row = {"kind": tok.kind, "downsample": tok.downsample, **code_budget(tok, val.shape[1])}
    row["psnr_val"] = reconstruction_psnr(tok, val, batch_size=batch_size)
    try:
        photos = load_split_images(digits, "photos", multiple_of=tok.downsample, limit=limit)
    except FileNotFoundError as e:
        print(f"[{name}] no photos split ({e}); psnr_photos is null", flush=True)
        row["psnr_photos"] = None
    else:
        row["psnr_photos"] = reconstruction_psnr(tok, photos, batch_size=batch_size)
    print(
        f"[{name}] {path}: {len(val)} val digits{'' if row['psnr_photos'] is None else ' + photos'}"
        f" in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    return row


def format_table(rows: dict[str, dict]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = (
        f"{'tokenizer':<14}{'kind':<7}{'f':>3}{'grid':>6}{'codes/img':>11}{'vocab':>12}"
        f"{'bits/img':>10}{'PSNR val':>10}{'PSNR photos':>13}"
    )
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        vocab = "continuous" if r["vocab_size"] is None else str(r["vocab_size"])
        lines.append(
            f"{name:<14}{r['kind']:<7}{r['downsample']:>3}{r['grid']:>4}x{r['grid']:<1}"
            f"{r['codes_per_image']:>11}{vocab:>12}{num(r['bits_per_image'], '.0f'):>10}"
            f"{num(r['psnr_val'], '.2f'):>10}{num(r['psnr_photos'], '.2f'):>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a tokenizer to measure (repeatable)",
    )
    parser.add_argument("--digits", default="runs/demo/digits", help="`t2i data digits` output")
    parser.add_argument("--limit", type=int, default=0, help="images per split; 0: all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    rows = {
        name: measure(
            name,
            path,
            args.digits,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
        )
        for name, path in parse_tokenizers(args.tokenizer).items()
    }
    print(format_table(rows))
    budgets = {r["codes_per_image"] for r in rows.values() if r["vocab_size"] is not None}
    if len(budgets) > 1:
        print(
            f"warning: the discrete tokenizers spend different code budgets per image "
            f"({sorted(budgets)}): their PSNRs are not directly comparable",
            flush=True,
        )
    print(
        json.dumps({name: {k: v for k, v in r.items() if k != "grid"} for name, r in rows.items()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
