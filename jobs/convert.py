"""`t2i convert`: ecosystem image-tokenizer checkpoints -> our tokenizer directory
(`model.safetensors` + `config.yaml`, loadable with `load_image_tokenizer` and `t2i tokenize`).

t2i convert --from openai-dvae --encoder ENC.pt --decoder DEC.pt --out DIR
t2i convert --from taming-vqgan --ckpt X.ckpt --config X.yaml --out DIR [--keep-loss]
python -m jobs.convert --from ...                  # same, without the console script

Inputs are state dicts (`.pt`/`.ckpt` read with `torch.load(weights_only=True)`, or
`.safetensors`); nothing is unpickled. Shapes are inferred from the weights and loaded strictly.
"""

from __future__ import annotations

import argparse
import json

from jobs.cli import run_module

# --from value -> the arguments it requires (checked in `run`, so the error names them)
SOURCES = {
    "openai-dvae": ("encoder", "decoder"),
    "taming-vqgan": ("ckpt", "config"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert OpenAI dVAE / taming VQGAN checkpoints into our tokenizer format",
        description=(
            "Convert a released image tokenizer into a directory of model.safetensors + "
            "config.yaml (local or s3://). openai-dvae: the state dicts of OpenAI's dall_e "
            "Encoder and Decoder (OpenAI's encoder.pkl/decoder.pkl pickle whole modules and are "
            "refused: save `.state_dict()` of each in a trusted environment first). "
            "taming-vqgan: a taming-transformers VQModel checkpoint and its YAML config."
        ),
    )
    p.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES))
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--encoder", help="openai-dvae: encoder state dict (.pt or .safetensors)")
    p.add_argument("--decoder", help="openai-dvae: decoder state dict (.pt or .safetensors)")
    p.add_argument("--ckpt", help="taming-vqgan: checkpoint (.ckpt; its state_dict is read)")
    p.add_argument("--config", help="taming-vqgan: the model's YAML config")
    p.add_argument(
        "--keep-loss",
        action="store_true",
        help="taming-vqgan: also keep the discriminator weights (to resume GAN training)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [f"--{name}" for name in SOURCES[args.source] if not getattr(args, name)]
    if missing:
        raise ValueError(f"--from {args.source} needs {' and '.join(missing)}")
    if args.keep_loss and args.source != "taming-vqgan":
        raise ValueError("--keep-loss applies to --from taming-vqgan only")
    if args.source == "openai-dvae":
        from trainer.pretrained.converters import convert_openai_dvae

        info = convert_openai_dvae(args.encoder, args.decoder, args.out)
    else:
        from trainer.pretrained.converters import convert_taming_vqgan

        info = convert_taming_vqgan(args.ckpt, args.config, args.out, keep_loss=args.keep_loss)
    print(f"convert: {args.source} -> {args.out}")
    print(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run_module("convert")
