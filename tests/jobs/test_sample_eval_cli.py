"""`t2i sample` then `t2i eval` through the CLI, as Ray tasks, writing to S3 (files and schema,
not quality: the models are tiny and untrained)."""

from __future__ import annotations

import json

from data_pipeline import fs
from data_pipeline.config import to_yaml
from data_pipeline.digits import DIGIT_WORDS, DigitsConfig, build_digits
from jobs.cli import build_parser, main
from tests.trainer.sample_fixtures import DIGIT_PROMPTS, make_sample_inputs
from trainer.config import TrainConfig


def make_clip_run(root) -> str:
    """An untrained CLIP exported as `t2i train` would (model.safetensors + config.yaml)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from trainer.objectives.clip import open_clip_arch

    cfg = TrainConfig(name="clip-tiny", objective="clip")
    open_clip_arch(cfg.clip.model, cfg.clip.model_config)
    torch.manual_seed(1)
    model = open_clip.create_model(cfg.clip.model, pretrained=None)
    root.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "model.safetensors"))
    (root / "config.yaml").write_text(to_yaml(cfg))
    return str(root)


def read_s3(uri: str) -> bytes:
    return fs.read_bytes(fs.resolve(uri))


def test_sample_and_eval_are_commands():
    names = list(next(a for a in build_parser()._actions if a.dest == "command").choices)
    assert names.index("train") < names.index("sample") < names.index("eval")


def test_sample_config_errors_are_one_line(capsys):
    config = ["sample", "--config", "jobs/configs/sample_digits.yaml"]
    args = [*config, "sample.candidates=8", "sample.keep=9"]  # refused before anything runs
    assert main(args) == 2
    assert "sample.keep must be in [1, sample.candidates=8]" in capsys.readouterr().err


def test_sample_then_eval_on_s3(ray_local, s3_bucket, tmp_path, capsys):
    inputs = make_sample_inputs(tmp_path / "inputs")
    digits = tmp_path / "digits"
    build_digits(DigitsConfig(out=str(digits), image_size=16, photos=0), log=lambda *_: None)
    samples = f"s3://{s3_bucket}/samples"
    prompts = DIGIT_PROMPTS[:2] + ["a cat"]
    rc = main(
        [
            "sample",
            "--config",
            "jobs/configs/sample_digits.yaml",
            *(f"{k}={v}" for k, v in inputs.items()),
            f"output={samples}",
            f"sample.prompts={json.dumps(prompts)}",
            "sample.candidates=3",
            "sample.keep=2",
            f"clip.checkpoint={make_clip_run(tmp_path / 'clip')}",
            "num_cpus=1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in read_s3(f"{samples}/samples.jsonl").decode().splitlines()]
    assert len(rows) == 6 and [r["prompt"] for r in rows[::2]] == prompts
    assert all(read_s3(f"{samples}/{r['path']}").startswith(b"\x89PNG") for r in rows)
    assert read_s3(f"{samples}/grid.png").startswith(b"\x89PNG")
    assert "sample: 6 image(s) for 3 prompt(s)" in capsys.readouterr().out

    rc = main(
        [
            "eval",
            "--config",
            "jobs/configs/eval_digits.yaml",
            f"samples={samples}",
            f"digits={digits}",
            f"image_tokenizer={inputs['image_tokenizer']}",
            "output=",  # default: <samples>/eval
            "classifier.epochs=1",
            "psnr_images=8",
            "num_cpus=1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(read_s3(f"{samples}/eval/eval.json"))
    assert doc["format"] == "ray-t2i/eval" and doc["images"] == 6
    assert doc["unlabelled_prompts"] == ["a cat"] and doc["accuracy"]["labelled"] == 4
    assert set(doc["accuracy"]["per_digit"]) == {str(d) for d in range(len(DIGIT_WORDS))}
    assert 0.0 <= doc["accuracy"]["overall"] <= 1.0
    assert doc["diversity"]["per_digit"]["0"]["generated"] is not None
    assert -1.0 <= doc["clip_score"]["mean"] <= 1.0 and doc["clip_score"]["images"] == 6
    assert doc["tokenizer"]["kind"] == "dvae" and doc["tokenizer"]["images"] == 8
    assert fs.exists(fs.resolve(f"{samples}/eval/classifier/classifier.safetensors"))
    assert "digit  accuracy" in out and f"{samples}/eval/eval.json" in out
