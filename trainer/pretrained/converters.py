"""Converters (`t2i convert`): ecosystem tokenizer weights -> a tokenizer directory
(`model.safetensors` + `config.yaml`) that `load_image_tokenizer` and `t2i train` read.

`convert_openai_dvae` (OpenAI's `dall_e` Encoder/Decoder state dicts) and `convert_taming_vqgan`
(a taming-transformers `VQModel` checkpoint + its YAML). Inputs are safetensors or
`torch.load(weights_only=True)` state dicts: nothing that pickles code is ever unpickled; shapes
are inferred and every name is loaded strictly. Local paths and s3:// URIs both work.

The `config.yaml` written is a `t2i train` config holding `name`, `objective`, the shape section
and (taming) the `vqgan_train:` loss settings carried over.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import yaml

from data_pipeline import fs
from data_pipeline.config import StorageConfig
from trainer.models.discriminator import DISC_PREFIX, NLayerDiscriminator
from trainer.models.dvae import DvaeConfig, DvaeTokenizer
from trainer.models.image_tokenizer import CONFIG, WEIGHTS, load_strict
from trainer.models.vqgan import LOSS_PREFIX, VqganConfig, VqganTokenizer, autoencoder_state
from trainer.pretrained.weights import load_weights

# --------------------------------------------------------------------------------------------
# OpenAI dall_e checkpoints -> a tokenizer directory
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str, storage=None) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a `torch.save`d dict (weights_only: no code runs)."""
    return load_weights(
        fs.read_bytes(fs.resolve(path, storage=storage)),
        path,
        hint="OpenAI's encoder.pkl / decoder.pkl hold whole modules. In a trusted environment "
        f"with the `dall_e` package, run `torch.save(dall_e.load_model('{path}').state_dict(), "
        "'encoder.pt')` (likewise for the decoder) and pass those files",
    )


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
        {"name": "openai-dvae", "objective": "dvae", "dvae": asdict(cfg)},
        storage=storage,
        downsample=cfg.downsample,
        vocab_size=cfg.vocab_size,
        dvae=asdict(cfg),
    )


def _write_tokenizer_dir(
    out_dir: str,
    state: dict[str, torch.Tensor],
    train_cfg: dict,
    *,
    storage=None,
    metadata: dict[str, str] | None = None,
    **summary,
) -> dict:
    """A converter's output: `state` (with safetensors `metadata`, if any) to
    `out_dir/model.safetensors`, then the `t2i train` config `train_cfg` to `out_dir/config.yaml`
    (last, so a directory with a config is complete). Returns {"out", "params", **summary}."""
    from safetensors.torch import save

    storage = storage or StorageConfig()
    out = fs.resolve(out_dir, storage=storage)
    fs.write_bytes_atomic(out.join(WEIGHTS), save(state, metadata=metadata))
    fs.write_bytes_atomic(out.join(CONFIG), yaml.safe_dump(train_cfg, sort_keys=False).encode())
    return {"out": out.uri, "params": sum(v.numel() for v in state.values()), **summary}


# --------------------------------------------------------------------------------------------
# taming-transformers checkpoints -> a tokenizer directory
# --------------------------------------------------------------------------------------------


def read_taming_state_dict(path: str) -> dict[str, torch.Tensor]:
    """`state_dict` of a taming `.ckpt` (Lightning) or a `.safetensors` file, never unpickling
    code: `torch.load(weights_only=True)` refuses any pickled global, and we name it."""
    return load_weights(
        fs.read_bytes(fs.resolve(path)),
        path,
        hint="in a trusted environment, re-save its weights only: `torch.save({'state_dict': "
        f"torch.load('{path}', weights_only=False)['state_dict']}}, 'weights.ckpt')` (or save "
        "them as .safetensors) and pass that file",
        unwrap="state_dict",
    )


# taming `VQLPIPSWithDiscriminator` params carried into `vqgan_train:` (same names there), and the
# discriminator shape's defaults (taming's, when its YAML leaves them out)
TAMING_LOSS_KEYS = (
    "disc_start",
    "codebook_weight",
    "pixelloss_weight",
    "perceptual_weight",
    "disc_weight",
    "disc_factor",
    "disc_num_layers",
    "disc_ndf",
    "disc_in_channels",
    "disc_loss",
)
TAMING_DISC_DEFAULTS = {"disc_in_channels": 3, "disc_ndf": 64, "disc_num_layers": 3}


def config_from_taming_yaml(path: str) -> tuple[VqganConfig, dict]:
    """The shape (`model.params.{ddconfig, n_embed, embed_dim}`) and the training settings
    (`model.params.lossconfig.params`, the `TAMING_LOSS_KEYS` given) of taming's model YAML."""
    doc = yaml.safe_load(fs.read_bytes(fs.resolve(path)).decode())
    try:
        params = doc["model"]["params"]
        dd, n_embed, embed_dim = params["ddconfig"], params["n_embed"], params["embed_dim"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a taming VQGAN config: missing key model.params.{e.args[0]}"
        ) from None
    loss = (params.get("lossconfig") or {}).get("params") or {}
    train = {k: v for k, v in loss.items() if k in TAMING_LOSS_KEYS}
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
    return shape, train


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
        d = {**TAMING_DISC_DEFAULTS, **train}
        disc = NLayerDiscriminator(d["disc_in_channels"], d["disc_ndf"], d["disc_num_layers"])
        disc_sd = {k[len(DISC_PREFIX) :]: v for k, v in sd.items() if k.startswith(DISC_PREFIX)}
        load_strict(disc, disc_sd, what=f"{ckpt_path} ({DISC_PREFIX}*)", layout="VQGAN")
        state.update({DISC_PREFIX + k: v.detach().contiguous() for k, v in disc_sd.items()})
    return _write_tokenizer_dir(
        out_dir,
        state,
        {"name": "taming-vqgan", "objective": "vqgan", "vqgan": asdict(cfg), "vqgan_train": train},
        metadata={"objective": "vqgan", "source": "taming-vqgan"},
        downsample=cfg.downsample,
        vocab_size=cfg.n_embed,
        kept_loss_keys=sum(k.startswith(LOSS_PREFIX) for k in state),
        vqgan=asdict(cfg),
        vqgan_train=train,
    )
