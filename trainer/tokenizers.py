"""Image tokenizers on storage: loading them, and converting ecosystem weights into them.

`trainer/models/` holds the pure modules (`DvaeTokenizer`, `VqganTokenizer`, `KlaeTokenizer`, the
`ImageTokenizer` base); this module is where they meet files and run configs:

    tok = load_image_tokenizer("runs/demo/train/dvae-digits")   # a run, a checkpoint, or a
    codes = tok.encode(images)                                 # `t2i convert` output directory
    recon = tok.decode(codes)

Images are float32 tensors (B, 3, H, W) in [0, 1] (H and W multiples of `tok.downsample`).
Discrete tokenizers return int64 codes (B, H/f, W/f) in [0, vocab_size); the KL autoencoder returns
latents (B, C, H/f, W/f) already multiplied by its `scaling_factor` (so they have ~unit variance,
as latent diffusion expects) and `decode` undoes that scaling.

A tokenizer directory holds `model.safetensors` (the model's own state dict) and `config.yaml` (a
`t2i train` config whose `objective` names the kind and whose section of that name is its shape).
Every exported `t2i train` checkpoint is such a directory, and so is what `t2i convert` writes.
A diffusers `AutoencoderKL` directory (`config.json` + `diffusion_pytorch_model.safetensors`, as
Stable Diffusion's `vae/` folder) loads too, as a KL-AE with the `scaling_factor` of its config.

Converters (`t2i convert`): `convert_openai_dvae` (OpenAI's `dall_e` Encoder/Decoder state dicts)
and `convert_taming_vqgan` (a taming-transformers `VQModel` checkpoint + its YAML) write such a
directory. Inputs are safetensors or `torch.load(weights_only=True)` state dicts: nothing that
pickles code is ever unpickled. Local paths and s3:// URIs both work (`data_pipeline.fs`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, fields

import torch

from data_pipeline import fs
from data_pipeline.config import StorageConfig, load_config, to_yaml
from trainer.checkpoint import find_exported
from trainer.config import TrainConfig, VqganTrainSection
from trainer.models.discriminator import DISC_PREFIX, NLayerDiscriminator
from trainer.models.dvae import DvaeConfig, DvaeTokenizer
from trainer.models.image_tokenizer import CONFIG, WEIGHTS, ImageTokenizer, load_strict
from trainer.models.klae import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, KlaeTokenizer
from trainer.models.vqgan import LOSS_PREFIX, VqganConfig, VqganTokenizer, autoencoder_state

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _dvae(cfg: TrainConfig, state: dict) -> ImageTokenizer:
    return DvaeTokenizer.from_state(cfg.dvae, state)


def _vqgan(cfg: TrainConfig, state: dict) -> ImageTokenizer:
    return VqganTokenizer.from_state(cfg.vqgan, state)


def _klae(cfg: TrainConfig, state: dict) -> ImageTokenizer:
    return KlaeTokenizer.from_state(cfg.klae, state)


# objective name -> builder(config, state dict) -> tokenizer (strict loading inside each builder)
BUILDERS: dict[str, Callable[[TrainConfig, dict], ImageTokenizer]] = {
    "dvae": _dvae,
    "vqgan": _vqgan,
    "klae": _klae,
}


def _tokenizer_dir(loc: fs.Location) -> fs.Location:
    """`loc` itself when it holds weights + config; else the newest complete checkpoint of the run
    at `loc` that has exported weights."""
    return find_exported(loc, weights=WEIGHTS, config=CONFIG, what="image tokenizer")


def load_image_tokenizer(
    path: str, *, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> ImageTokenizer:
    """Load a dVAE, VQGAN or KL-AE from a local or s3:// directory (see the module docstring).

    Weights load with safetensors (no pickle) and `strict=True`; the tokenizer is in eval mode.
    """
    from safetensors.torch import load_file

    storage = storage or StorageConfig()
    loc = fs.resolve(path, storage=storage)
    if _is_diffusers_dir(loc):
        return _load_diffusers_klae(loc, device)
    src = _tokenizer_dir(loc)
    tmp = tempfile.mkdtemp(prefix="t2i-tokenizer-")
    try:
        for name in (WEIGHTS, CONFIG):
            with open(os.path.join(tmp, name), "wb") as out:
                out.write(fs.read_bytes(src.join(name)))
        # migrate: a run exported before a key moved (TrainConfig.RENAMED) still loads
        cfg = load_config(TrainConfig, os.path.join(tmp, CONFIG), require=False, migrate=True)
        if cfg.objective not in BUILDERS:
            raise ValueError(
                f"{src.join(CONFIG).uri}: objective {cfg.objective!r} is not an image tokenizer "
                f"(expected one of {', '.join(BUILDERS)})"
            )
        state = load_file(os.path.join(tmp, WEIGHTS))
        _, digest = fs.file_digest(os.path.join(tmp, WEIGHTS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = BUILDERS[cfg.objective](cfg, state)
    tok.fingerprint = digest
    return tok.to(device).eval()


def _is_diffusers_dir(loc: fs.Location) -> bool:
    return fs.exists(loc.join(DIFFUSERS_CONFIG)) and fs.exists(loc.join(DIFFUSERS_WEIGHTS))


def _load_diffusers_klae(loc: fs.Location, device: str | torch.device) -> ImageTokenizer:
    """A diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.torch import load

    cfg_loc = loc.join(DIFFUSERS_CONFIG)
    try:
        config = json.loads(fs.read_bytes(cfg_loc))
    except ValueError as e:
        raise ValueError(f"{cfg_loc.uri}: not valid JSON: {e}") from None
    weights = fs.read_bytes(loc.join(DIFFUSERS_WEIGHTS))
    tok = KlaeTokenizer.from_diffusers(config, load(weights), source=cfg_loc.uri)
    tok.fingerprint = hashlib.sha256(weights).hexdigest()
    return tok.to(device).eval()


def read_init_state(path: str, storage: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The weights of `vqgan_train.init_from`: a safetensors file or a directory holding one
    (`storage`: the job's S3 endpoint, region, retries and timeouts)."""
    from safetensors.torch import load

    loc = fs.resolve(path, storage=storage)
    if not path.endswith(".safetensors"):
        loc = loc.join(WEIGHTS)
    return load(fs.read_bytes(loc))


# --------------------------------------------------------------------------------------------
# OpenAI dall_e checkpoints -> a tokenizer directory
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str, storage=None) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a `torch.save`d dict (weights_only: no code runs)."""
    loc = fs.resolve(path, storage=storage)
    data = fs.read_bytes(loc)
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: not a plain state dict (it pickles code, e.g. OpenAI's encoder.pkl / "
            f"decoder.pkl hold whole modules), and we never unpickle code. In a trusted "
            f"environment with the `dall_e` package, run `torch.save(dall_e.load_model("
            f"'{path}').state_dict(), 'encoder.pt')` (likewise for the decoder) and pass those "
            f"files. ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _need(sd: dict, key: str, path: str) -> torch.Tensor:
    if key not in sd:
        first = next(iter(sd), None)
        raise ValueError(
            f"{path}: missing key {key!r}: not an OpenAI dall_e state-dict layout "
            f"(first key found: {first!r})"
        )
    return sd[key]


def _count(sd: dict, prefix: str) -> int:
    """Consecutive `<prefix>1.`, `<prefix>2.`, ... present in the keys."""
    n = 0
    while any(k.startswith(f"{prefix}{n + 1}.") for k in sd):
        n += 1
    return n


def infer_openai_dvae_config(
    enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], enc_path: str, dec_path: str
) -> DvaeConfig:
    """The DvaeConfig of an OpenAI Encoder/Decoder pair, read from the weight shapes alone."""
    n_hid, channels, kw, _ = _need(enc, "blocks.input.w", enc_path).shape
    vocab = _need(enc, "blocks.output.conv.w", enc_path).shape[0]
    n_init, dec_vocab = _need(dec, "blocks.input.w", dec_path).shape[:2]
    dec_out, dec_n_hid = _need(dec, "blocks.output.conv.w", dec_path).shape[:2]
    groups = _count(enc, "blocks.group_")
    dec_groups = _count(dec, "blocks.group_")
    n_blk = _count(enc, "blocks.group_1.block_")
    dec_n_blk = _count(dec, "blocks.group_1.block_")
    if (vocab, channels, groups) != (dec_vocab, dec_out // 2, dec_groups):
        raise ValueError(
            f"{enc_path} and {dec_path} are not a pair: encoder (vocab {vocab}, channels "
            f"{channels}, groups {groups}) vs decoder (vocab {dec_vocab}, channels "
            f"{dec_out // 2}, groups {dec_groups})"
        )
    if not groups or not n_blk or not dec_n_blk:
        raise ValueError(
            f"{enc_path if not groups or not n_blk else dec_path}: missing key "
            f"'blocks.group_1.block_1.res_path.conv_1.w': no residual groups found"
        )
    f = 2 ** (groups - 1)
    return DvaeConfig(
        image_size=32 * f,  # DALL-E's 32x32 grid; the weights do not fix a resolution
        group_count=groups,
        n_hid=int(n_hid),
        n_blk_per_group=n_blk,
        decoder_n_hid=int(dec_n_hid),
        decoder_n_blk_per_group=dec_n_blk,
        n_init=int(n_init),
        vocab_size=int(vocab),
        channels=int(channels),
    )


def convert_openai_dvae(
    encoder_path: str, decoder_path: str, out_dir: str, *, storage=None
) -> dict:
    """OpenAI `dall_e` Encoder/Decoder state dicts (`torch.save(enc.state_dict())` files or
    .safetensors) -> `out_dir/model.safetensors` + `out_dir/config.yaml`, a tokenizer directory
    for `load_image_tokenizer`. Shapes are inferred from the weights and loaded strictly; a
    whole pickled module (OpenAI's `encoder.pkl`) is refused, never unpickled."""
    enc = _read_state_dict(encoder_path, storage)
    dec = _read_state_dict(decoder_path, storage)
    cfg = infer_openai_dvae_config(enc, dec, encoder_path, decoder_path)
    tok = DvaeTokenizer(cfg)
    load_strict(tok.encoder, enc, what=encoder_path, layout="dVAE")
    load_strict(tok.decoder, dec, what=decoder_path, layout="dVAE")
    state = {k: v.detach().float().contiguous() for k, v in tok.state_dict().items()}
    # No metadata: safetensors writes a metadata dict in no fixed order, and the fingerprint of
    # a conversion should depend on the weights alone (convert twice -> same fingerprint).
    return _write_tokenizer_dir(
        out_dir,
        state,
        TrainConfig(name="openai-dvae", objective="dvae", dvae=cfg),
        storage=storage,
        downsample=cfg.downsample,
        vocab_size=cfg.vocab_size,
        dvae=asdict(cfg),
    )


def _write_tokenizer_dir(
    out_dir: str,
    state: dict[str, torch.Tensor],
    train_cfg: TrainConfig,
    *,
    storage=None,
    metadata: dict[str, str] | None = None,
    **summary,
) -> dict:
    """A converter's output: `state` (with safetensors `metadata`, if any) to
    `out_dir/model.safetensors`, then `train_cfg` to `out_dir/config.yaml` (last, so a directory
    with a config is complete). Returns {"out", "params", **summary}."""
    from safetensors.torch import save

    storage = storage or StorageConfig()
    out = fs.resolve(out_dir, storage=storage)
    fs.write_bytes_atomic(out.join(WEIGHTS), save(state, metadata=metadata))
    fs.write_bytes_atomic(out.join(CONFIG), to_yaml(train_cfg).encode())  # config last
    return {"out": out.uri, "params": sum(v.numel() for v in state.values()), **summary}


# --------------------------------------------------------------------------------------------
# taming-transformers checkpoints -> a tokenizer directory
# --------------------------------------------------------------------------------------------

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def read_taming_state_dict(path: str) -> dict[str, torch.Tensor]:
    """`state_dict` of a taming `.ckpt` (Lightning) or a `.safetensors` file, never unpickling
    code: `torch.load(weights_only=True)` refuses any pickled global, and we name it."""
    data = fs.read_bytes(fs.resolve(path))
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL_RE.search(str(e))
        name = found.group(1) if found else str(e).splitlines()[0]
        raise ValueError(
            f"{path}: the checkpoint pickles {name}, and we never unpickle code. In a trusted "
            f"environment, re-save its weights only: `torch.save({{'state_dict': torch.load("
            f"'{path}', weights_only=False)['state_dict']}}, 'weights.ckpt')` (or save them as "
            f".safetensors) and pass that file."
        ) from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


def config_from_taming_yaml(path: str) -> tuple[VqganConfig, VqganTrainSection]:
    """The shape (`model.params.{ddconfig, n_embed, embed_dim}`) and the training settings
    (`model.params.lossconfig.params`) of taming's model YAML."""
    import yaml

    doc = yaml.safe_load(fs.read_bytes(fs.resolve(path)).decode())
    try:
        params = doc["model"]["params"]
        dd, n_embed, embed_dim = params["ddconfig"], params["n_embed"], params["embed_dim"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a taming VQGAN config: missing key model.params.{e.args[0]}"
        ) from None
    loss = (params.get("lossconfig") or {}).get("params") or {}
    known = {f.name for f in fields(VqganTrainSection)}
    train = {k: v for k, v in loss.items() if k in known}
    if loss.get("use_actnorm"):
        raise ValueError(f"{path}: lossconfig.params.use_actnorm=true is not supported")
    if "disc_conditional" in loss and loss["disc_conditional"]:
        raise ValueError(f"{path}: lossconfig.params.disc_conditional=true is not supported")
    try:
        shape = VqganConfig(
            image_size=int(dd["resolution"]),
            in_channels=int(dd["in_channels"]),
            out_ch=int(dd["out_ch"]),
            ch=int(dd["ch"]),
            ch_mult=[int(m) for m in dd["ch_mult"]],
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=[int(r) for r in dd.get("attn_resolutions", [])],
            dropout=float(dd.get("dropout", 0.0)),
            z_channels=int(dd["z_channels"]),
            double_z=bool(dd.get("double_z", False)),
            n_embed=int(n_embed),
            embed_dim=int(embed_dim),
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing key model.params.ddconfig.{e.args[0]}") from None
    return shape, VqganTrainSection(**train)


def convert_taming_vqgan(
    ckpt_path: str, config_path: str, out_dir: str, *, keep_loss: bool = False
) -> dict:
    """taming `VQModel` checkpoint (+ its YAML) -> `out_dir/model.safetensors` + `config.yaml`,
    a tokenizer directory for `load_image_tokenizer` (and a `t2i train` starting point).

    The autoencoder keys load strictly (an error names the first missing/unexpected key);
    `loss.discriminator.*` is kept with `keep_loss` (to resume GAN training), other `loss.*`
    keys (LPIPS) are dropped."""
    sd = read_taming_state_dict(ckpt_path)
    cfg, train = config_from_taming_yaml(config_path)
    tok = VqganTokenizer(cfg)
    load_strict(tok, autoencoder_state(sd), what=ckpt_path, layout="VQGAN")
    state = {k: v.detach().float().contiguous() for k, v in tok.state_dict().items()}
    if keep_loss:
        disc = NLayerDiscriminator(train.disc_in_channels, train.disc_ndf, train.disc_num_layers)
        disc_sd = {k[len(DISC_PREFIX) :]: v for k, v in sd.items() if k.startswith(DISC_PREFIX)}
        load_strict(disc, disc_sd, what=f"{ckpt_path} ({DISC_PREFIX}*)", layout="VQGAN")
        state.update({DISC_PREFIX + k: v.detach().contiguous() for k, v in disc_sd.items()})
    return _write_tokenizer_dir(
        out_dir,
        state,
        TrainConfig(name="taming-vqgan", objective="vqgan", vqgan=cfg, vqgan_train=train),
        metadata={"objective": "vqgan", "source": "taming-vqgan"},
        downsample=cfg.downsample,
        vocab_size=cfg.n_embed,
        kept_loss_keys=sum(k.startswith(LOSS_PREFIX) for k in state),
        vqgan=asdict(cfg),
        vqgan_train=asdict(train),
    )
