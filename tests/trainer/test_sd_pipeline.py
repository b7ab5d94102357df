"""Stable Diffusion in and out (#26), on a tiny random SD pipeline built here (no downloads):
tokenize with its VAE + text encoder, fine-tune from its U-Net under ZeRO-2/3, export a pipeline
folder diffusers loads, sample it; broken folders fail naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.sd_fixtures import TEXT_LEN, TEXT_WIDTH, build_tiny_sd

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["the digit 7", "digit 1"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    build_tiny_sd(str(folder))
    return folder


@pytest.fixture(scope="module")
def sd_latents(ray_local, sd_dir, tmp_path_factory):
    """`t2i tokenize recipe=ldm pretrained=<tiny SD>` on 16x16 digits (val split)."""
    from data_pipeline.config import load_config
    from data_pipeline.digits import DigitsConfig, build_digits
    from data_pipeline.tokenize.config import TokenizeConfig
    from data_pipeline.tokenize.job import run_tokenize

    root = tmp_path_factory.mktemp("sd-data")
    build_digits(DigitsConfig(out=str(root / "digits"), photos=0), log=lambda *_: None)
    cfg = load_config(TokenizeConfig, REPO / "jobs/configs/tokenize_sd.yaml", [
        f"input={root / 'digits/val'}", f"output={root / 'latents'}", f"pretrained={sd_dir}",
        "image_size=16", "image_tokenizer.batch_size=32", "text_encoder.batch_size=32",
        "image_tokenizer.concurrency=1", "text_encoder.concurrency=1",
    ])  # fmt: skip
    manifest = run_tokenize(cfg, log=lambda *_: None)
    return root / "latents", manifest


def test_tokenize_with_the_pipelines_vae_and_text_encoder(sd_dir, sd_latents):
    """Latents and text states equal diffusers' own vae.encode / pipeline.encode_prompt."""
    from diffusers import StableDiffusionPipeline

    from data_pipeline import fs
    from data_pipeline import token_dataset as T
    from data_pipeline.text_tokens import load_text_tokenizer

    out, manifest = sd_latents
    assert manifest["latent_shape"] == [4, 8, 8]
    assert manifest["text_embedding_shape"] == [TEXT_LEN, TEXT_WIDTH]
    enc = manifest["text_encoder"]
    weights = sd_dir / "text_encoder/model.safetensors"
    assert enc["checkpoint"] == str(weights) and enc["pretrained"] == str(sd_dir)
    assert enc["checkpoint_sha256"] == fs.file_digest(str(weights))[1]
    vae_weights = sd_dir / "vae/diffusion_pytorch_model.safetensors"
    assert manifest["image_tokenizer"]["fingerprint"] == fs.file_digest(str(vae_weights))[1]
    assert manifest["image_tokenizer"]["path"] == f"{sd_dir}/vae"

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    import pyarrow.parquet as pq

    table = pq.read_table(out / manifest["shards"][0]["path"]).slice(0, 4)
    rows = table.to_pylist()  # the stored rows (fp16 lists), in shard order
    tok = load_text_tokenizer(str(out))
    assert tok.kind == "clip_folder" and tok.pad_id == pipe.tokenizer.pad_token_id
    ref_rows = _source_rows(out, manifest, len(rows))
    with torch.no_grad():
        for r, (caption, image) in zip(rows, ref_rows, strict=True):
            ids = tok.encode([caption])
            expected = pipe.encode_prompt(caption, "cpu", 1, False)[0][0]
            got = torch.tensor(r[T.TEXT_EMBEDDING], dtype=torch.float32).reshape(TEXT_LEN, -1)
            torch.testing.assert_close(got, expected.half().float(), rtol=0, atol=0)
            assert ids.shape == (1, TEXT_LEN)
            x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
            lat = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
            got = torch.tensor(r[T.LATENT], dtype=torch.float32).reshape(1, 4, 8, 8)
            # batched (32 rows, padded) vs one image: fp32 sums differ in the last bits, which
            # the fp16 storage rounding may show as one fp16 step
            torch.testing.assert_close(got, lat, rtol=0, atol=2e-3)


def _source_rows(out: Path, manifest: dict, n: int) -> list[tuple[str, np.ndarray]]:
    """(caption, 16x16 uint8 image) of the input samples behind the first output rows, decoded
    as tokenize decodes them."""
    import pyarrow.parquet as pq
    from PIL import Image

    from data_pipeline import columns as C
    from data_pipeline.validate import decode_image, resize_center_crop
    from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows

    table = pq.read_table(out / manifest["shards"][0]["path"], columns=[C.KEY, C.CAPTION])
    keys = table[C.KEY].to_pylist()[:n]
    captions = table[C.CAPTION].to_pylist()[:n]
    src = {}
    for shard in sorted((out.parent / "digits/val").glob("*.tar")):
        for r in read_shard_rows(str(shard), ReaderLimits.of()):
            src[r[C.KEY]] = r[C.IMAGE]
    images = []
    for k in keys:
        rgb = decode_image(bytes(src[k]), 1 << 30)[0]
        images.append(resize_center_crop(Image.fromarray(rgb), 16))
    return list(zip(captions, images, strict=True))


def _fit_sd(tmp_path, name, sd_dir, data, *overrides):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig
    from trainer.launch import fit

    cfg = load_config(TrainConfig, REPO / "jobs/configs/ldm_sd2_finetune.yaml", [
        f"name={name}", f"checkpoint.storage_path={tmp_path}", f"ldm.init_from={sd_dir}",
        f"data.path={data}", "scaling.num_workers=2", "scaling.use_gpu=false",
        "scaling.cpus_per_worker=1", "engine.precision=fp32", "engine.activation_checkpointing=false",
        "steps=1", "log_every=1", "checkpoint.every_steps=1", "data.batch_size=4",
        "ldm.sample_steps=2", "failure_max_retries=0", "optimizer.warmup_steps=0", *overrides,
    ])  # fmt: skip
    result = fit(cfg)
    assert result.error is None, result.error
    return tmp_path / name / "checkpoints" / "step_00000001"


def _ds_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag="state")


def test_finetune_from_the_pipeline_under_zero3_and_zero2_lora_exports_a_pipeline(
    sd_dir, sd_latents, tmp_path, caplog
):
    """2 workers start from the pipeline's U-Net under ZeRO-3 (lr 0: the step-0 weights are what
    training holds after the step) and under ZeRO-2 with LoRA (the frozen base); the export is a
    StableDiffusionPipeline whose image equals `t2i sample`'s for the same latents, prompt,
    scheduler and steps; the LoRA export loads with load_lora_weights and changes the image."""
    import logging

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from trainer.models.unet import Unet, shape_of
    from trainer.pretrained.diffusers_sd import released_unet
    from trainer.sampling.config import SampleConfig
    from trainer.sampling.ldm import LdmGenerator

    data, _ = sd_latents
    original = load_file(str(sd_dir / "unet/diffusion_pytorch_model.safetensors"))
    z3 = _fit_sd(tmp_path, "z3", sd_dir, data, "engine.zero_stage=3", "optimizer.lr=0")
    # ZeRO-2 with LoRA: the base frozen at the pipeline's weights, the adapters trained
    lora = _fit_sd(tmp_path, "lora", sd_dir, data, "engine.zero_stage=2", "optimizer.lr=0.05",
                   "ldm.lora_rank=4")  # fmt: skip
    weights = _ds_weights(z3)  # DeepSpeed's own consolidation of what the ranks trained
    assert set(weights) == {f"unet.{k}" for k in original}
    for k, v in original.items():
        assert torch.equal(weights[f"unet.{k}"], v), k
    lw = _ds_weights(lora)
    base = {k.replace(".base_layer", ""): v for k, v in lw.items() if ".lora_" not in k}
    assert set(base) == {f"unet.{k}" for k in original}
    for k, v in original.items():
        assert torch.equal(base[f"unet.{k}"], v), k
    adapters = {k: v for k, v in lw.items() if ".lora_" in k}
    assert adapters and any(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)
    # under ZeRO-2 only the adapters carry optimizer state (fp32 partitions, all ranks)
    held = sum(
        t.numel()
        for f in (lora / "ds/state").glob("*optim_states.pt")
        for t in torch.load(f, weights_only=False)["optimizer_state_dict"][
            "single_partition_of_fp32_groups"]
    )  # fmt: skip
    n_adapters = sum(v.numel() for v in adapters.values())
    assert n_adapters <= held < n_adapters + 64, (held, n_adapters)
    # step-0 predictions of the loaded U-Net equal the original U-Net's
    released = released_unet(str(sd_dir))
    ours = Unet(shape_of(released.config), released.unet_config)
    ours.load_state_dict(_ds_weights(z3))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, TEXT_LEN, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(z, t, text), pipe.unet(z, t, text).sample, rtol=0, atol=0)

    # The export: a complete pipeline folder, EMA weights in unet/ with the raw ones beside them.
    for part in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/config.json",
                 "text_encoder/config.json", "tokenizer/vocab.json",
                 "scheduler/scheduler_config.json"):  # fmt: skip
        assert (z3 / part).is_file(), part
    import diffusers
    import transformers

    caplog.set_level(logging.WARNING)  # both libraries report missing weights on their loggers
    diffusers.utils.logging.enable_propagation()
    transformers.utils.logging.enable_propagation()
    exported = StableDiffusionPipeline.from_pretrained(str(z3))
    diffusers.utils.logging.disable_propagation()
    transformers.utils.logging.disable_propagation()
    warned = [r.getMessage() for r in caplog.records if "missing" in r.getMessage().lower()
              or "not initialized" in r.getMessage().lower()]  # fmt: skip
    assert warned == []
    ema = load_file(str(z3 / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ema[k], v) for k, v in original.items())  # lr 0: EMA = weights

    # `t2i sample recipe=ldm model=<export>` and diffusers' pipeline: same image.
    cfg = SampleConfig(recipe="ldm", model=str(z3), output=str(tmp_path / "s"), precision="fp32")
    cfg.sample.steps, cfg.sample.guidance, cfg.sample.scheduler = 4, 3.0, "ddim"
    gen = LdmGenerator(cfg, PROMPTS, "cpu", log=lambda *_: None)
    chunk_seed = 1234
    z0 = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(chunk_seed))
    ours_img = gen.image_tok.decode(_sample(gen, 0, chunk_seed))
    exported.scheduler = DDIMScheduler.from_config(exported.scheduler.config)
    theirs = exported(PROMPTS[0], latents=z0[None], num_inference_steps=4, guidance_scale=3.0,
                      output_type="pt").images  # fmt: skip
    torch.testing.assert_close(ours_img, theirs, rtol=0, atol=1e-4)

    # The LoRA run's export: base unet/ unchanged, its adapters load with load_lora_weights.
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    base_export = load_file(str(lora / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(base_export[k], v) for k, v in original.items())
    with_lora = StableDiffusionPipeline.from_pretrained(str(lora))
    with_lora.scheduler = DDIMScheduler.from_config(with_lora.scheduler.config)
    kwargs = dict(latents=z0[None], num_inference_steps=4, guidance_scale=3.0, output_type="pt")
    before = with_lora(PROMPTS[0], **kwargs).images
    torch.testing.assert_close(before, theirs, rtol=0, atol=1e-4)  # the base: the original
    with_lora.load_lora_weights(str(lora))
    after = with_lora(PROMPTS[0], **kwargs).images
    assert (after - before).abs().max() > 1e-3


def _sample(gen, prompt: int, seed: int) -> torch.Tensor:
    """The latents `t2i sample` draws for one candidate of `prompt` with `seed`."""
    from data_pipeline import token_dataset as T
    from trainer.sampling.ldm import build_scheduler, sample_latents

    s = gen.cfg.sample
    return sample_latents(
        gen.model,
        build_scheduler(s.scheduler, gen.sched_config),
        gen.text[[prompt]],
        None,
        gen.uncond[T.TEXT_EMBEDDING],
        None,
        latent_shape=gen.latent_shape,
        steps=s.steps,
        guidance=s.guidance,
        generator=[torch.Generator().manual_seed(seed)],
        eta=s.eta,
        dtype=gen.dtype,
    )


def test_a_broken_folder_fails_with_one_line_naming_the_file(sd_dir, sd_latents, tmp_path):
    """Missing U-Net / text-encoder weights, a renamed weight, and a U-Net whose text width is
    not the dataset's: each fails before any training, naming the file."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from trainer.config import TrainConfig
    from trainer.objectives.ldm import LdmObjective
    from trainer.pretrained.diffusers_sd import load_text_encoder, released_unet

    def broken(name):
        dst = tmp_path / name
        shutil.copytree(sd_dir, dst)
        return dst

    no_unet = broken("no_unet")
    (no_unet / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        released_unet(str(no_unet))
    assert str(e.value).startswith(f"{no_unet}/unet/diffusion_pytorch_model.safetensors: missing")
    assert "\n" not in str(e.value)

    no_te = broken("no_te")
    (no_te / "text_encoder/model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"^{no_te}/text_encoder/model.safetensors: "):
        load_text_encoder(str(no_te))

    renamed = broken("renamed")
    weights = renamed / "unet/diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["conv_in.kernel"] = sd.pop("conv_in.weight")
    save_file(sd, str(weights))
    with pytest.raises(ValueError) as e:
        released_unet(str(renamed))
    assert str(e.value).startswith(f"{weights}: weights do not match the model: missing key "
                                   "'conv_in.weight'")  # fmt: skip

    wide = broken("wide")  # a U-Net for 48-wide text states; the dataset's are 32 wide
    config = json.loads((wide / "unet/config.json").read_text())
    config["cross_attention_dim"] = 48
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    shutil.rmtree(wide / "unet")
    unet.save_pretrained(str(wide / "unet"))
    data, _ = sd_latents
    cfg = TrainConfig(name="wide", objective="ldm")
    cfg.ldm.init_from, cfg.data.source, cfg.data.path = str(wide), "tokens", str(data)
    with pytest.raises(ValueError) as e:
        LdmObjective(cfg).manifest()
    assert "\n" not in str(e.value) and f"{wide}/unet/config.json" in str(e.value)
    assert "32" in str(e.value) and "48" in str(e.value)


def test_init_from_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from trainer.config import TrainConfig
    from trainer.launch import absolutize

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(name="x", objective="ldm")
    cfg.ldm.init_from = "runs/sd/tiny-sd"
    assert absolutize(cfg).ldm.init_from == str(tmp_path / "runs/sd/tiny-sd")
    cfg.ldm.init_from = "s3://bucket/sd"
    assert absolutize(cfg).ldm.init_from == "s3://bucket/sd"
