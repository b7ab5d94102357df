"""`load_image_tokenizer` (errors, run directories, S3) and the reconstruction-quality helpers."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_pipeline import fs
from data_pipeline.config import to_yaml
from trainer import checkpoint as ck
from trainer.config import TrainConfig
from trainer.models.image_tokenizer import ImageTokenizer
from trainer.models.klae import SCALE_KEY, KlaeConfig, KlaeTokenizer
from trainer.pretrained.image_tokenizers import load_image_tokenizer
from trainer.recon import (
    PSNR_CAP_DB,
    load_split_images,
    per_image_psnr,
    psnr,
    reconstruction_psnr,
)

TINY = KlaeConfig(image_size=16, block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4)


def write_tokenizer(path: Path, scale: float, *, objective: str = "klae") -> Path:
    """A tokenizer directory as the final checkpoint writes it (tiny KL-AE, given scale)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in KlaeTokenizer(TINY).state_dict().items()}
    save_file({**state, SCALE_KEY: torch.tensor(scale)}, str(path / "model.safetensors"))
    cfg = TrainConfig(name="tok", objective=objective, klae=TINY)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


def write_checkpoint(run: fs.Location, step: int, staged: Path, *, complete: bool = True) -> None:
    """Upload `staged` as checkpoint `step` of `run`; the manifest (written last) makes it
    complete."""
    dest = run.join("checkpoints", ck.step_dir_name(step))
    files = ck.upload_dir(str(staged), dest)
    if complete:
        ck.write_manifest(dest, step, files)


def test_missing_files_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/empty: no image tokenizer here"):
        load_image_tokenizer(str(tmp_path / "empty"))
    only_weights = write_tokenizer(tmp_path / "half", 0.5)
    (only_weights / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/half: .*model.safetensors"):
        load_image_tokenizer(str(only_weights))


def test_non_tokenizer_objective_is_refused(tmp_path):
    d = write_tokenizer(tmp_path / "clip", 0.5, objective="clip")
    with pytest.raises(ValueError, match=r"clip/config.yaml: objective 'clip' is not an image"):
        load_image_tokenizer(str(d))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_dir_loads_newest_complete_checkpoint_with_weights(request, tmp_path, where):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/runs/klae"
    else:
        uri = str(tmp_path / "runs" / "klae")
    run = fs.resolve(uri)
    write_checkpoint(run, 100, write_tokenizer(tmp_path / "s100", 0.1))
    write_checkpoint(run, 200, write_tokenizer(tmp_path / "s200", 0.2))  # <- expected
    no_weights = write_tokenizer(tmp_path / "s300", 0.3)
    (no_weights / "model.safetensors").unlink()  # a mid-run checkpoint: engine state only
    write_checkpoint(run, 300, no_weights)
    write_checkpoint(run, 400, write_tokenizer(tmp_path / "s400", 0.4), complete=False)  # crash

    tok = load_image_tokenizer(uri)
    assert isinstance(tok, KlaeTokenizer) and tok.scaling_factor == pytest.approx(0.2)
    assert not tok.training and tok.describe()["fingerprint"] == tok.fingerprint != ""

    # The checkpoint directory itself is a tokenizer directory too.
    direct = load_image_tokenizer(f"{uri}/checkpoints/{ck.step_dir_name(100)}")
    assert direct.scaling_factor == pytest.approx(0.1) and direct.fingerprint != tok.fingerprint


def test_s3_tokenizer_dir_matches_local(tmp_path, s3_bucket):
    local = write_tokenizer(tmp_path / "tok", 0.25)
    dest = fs.resolve(f"s3://{s3_bucket}/tokenizers/klae")
    ck.upload_dir(str(local), dest)
    a, b = load_image_tokenizer(str(local)), load_image_tokenizer(dest.uri)
    assert a.fingerprint == b.fingerprint
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(a.encode(x), b.encode(x))


# --------------------------------------------------------------------------------------------
# PSNR and the split reader
# --------------------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_inf_and_capped_per_image():
    x = np.random.default_rng(0).random((3, 8, 8, 3))
    assert psnr(x, x.copy()) == math.inf
    np.testing.assert_array_equal(per_image_psnr(x, x), [PSNR_CAP_DB] * 3)


def test_psnr_of_known_noise():
    # +-0.1 everywhere: MSE 0.01 -> exactly 20 dB, as numpy or torch.
    x = np.full((2, 16, 16, 3), 0.5)
    signs = np.where(np.indices(x.shape).sum(0) % 2 == 0, 1.0, -1.0)
    assert psnr(x, x + 0.1 * signs) == pytest.approx(20.0, abs=1e-9)
    assert psnr(torch.tensor(x), torch.tensor(x - 0.1 * signs)) == pytest.approx(20.0, abs=1e-6)
    # Gaussian noise of std s: PSNR -> -20 log10(s) = 26.02 dB for s = 0.05.
    noise = np.random.default_rng(1).normal(0.0, 0.05, size=(64, 32, 32, 3))
    assert psnr(x.mean() + noise, np.full_like(noise, x.mean())) == pytest.approx(26.02, abs=0.05)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2)), np.zeros((2, 3)))


class ShiftTokenizer(ImageTokenizer):
    """Reconstructs every pixel value `shift` too bright: a known per-image PSNR."""

    kind = "shift"
    downsample = 1

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift

    def encode(self, images):
        return images

    def decode(self, codes):
        return codes + self.shift


def test_reconstruction_psnr_of_a_known_error():
    images = np.random.default_rng(0).integers(0, 200, size=(5, 8, 8, 3), dtype=np.uint8)
    assert reconstruction_psnr(ShiftTokenizer(0.1), images, batch_size=2) == pytest.approx(
        20.0, abs=1e-4
    )
    assert reconstruction_psnr(ShiftTokenizer(0.0), images) == PSNR_CAP_DB
    floats = images.astype(np.float32) / 255.0  # float images in [0, 1] are accepted too
    assert reconstruction_psnr(ShiftTokenizer(0.01), floats) == pytest.approx(40.0, abs=1e-3)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from data_pipeline.digits import DigitsConfig, build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=str(out), photos=4, photo_size=40), log=lambda *_: None)
    yield out
    shutil.rmtree(out, ignore_errors=True)


def test_load_split_images(digits_dir):
    val = load_split_images(str(digits_dir), "val")
    assert val.dtype == np.uint8 and val.shape == (180, 32, 32, 3)
    assert val.max() > 200 and val[:, 0, 0].max() < 30  # white digits on black borders
    assert load_split_images(str(digits_dir), "val", multiple_of=8).shape == val.shape
    np.testing.assert_array_equal(load_split_images(str(digits_dir), "val", limit=5), val[:5])

    photos = load_split_images(str(digits_dir), "photos", multiple_of=12)  # 40 px -> 36 px
    assert photos.shape == (4, 36, 36, 3) and photos.std() > 10
    with pytest.raises(FileNotFoundError, match=rf"{digits_dir}/nope: no .tar shards"):
        load_split_images(str(digits_dir), "nope")
