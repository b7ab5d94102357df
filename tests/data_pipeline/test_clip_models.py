"""trainer/pretrained/clip_models.py: the OpenAI QuickGELU trap refused (with the model name that
fixes it), weights read weights-only with strict names, and s3:// CLIP checkpoints."""

import json

import boto3
import pytest
import torch
from safetensors.torch import save_file

from data_pipeline import fs
from trainer.pretrained.clip_models import ClipSpec, build_clip, check_checkpoint

TINY = {  # a tiny open_clip CLIP (the OpenAI layout: text tower at top level)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def openai_layout_state() -> dict:
    """The names (not the sizes) of an OpenAI CLIP ViT state dict: what the detector reads."""
    t = torch.zeros(2)
    keys = ["positional_embedding", "text_projection", "token_embedding.weight",
            "ln_final.weight", "ln_final.bias", "logit_scale", "visual.class_embedding",
            "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.0.attn.in_proj_weight"]  # fmt: skip
    return {k: t.clone() for k in keys}


def spec(model: str, checkpoint: str, config: dict | None = None, activation: str = "auto"):
    return ClipSpec(model, config, checkpoint, 2, 1, activation)


def test_openai_quickgelu_trap_refused(tmp_path):
    """An OpenAI-layout state dict that does not say how it was trained is refused under the GELU
    `ViT-B-32` (the message names ViT-B-32-quickgelu); whatever records the activation wins."""
    plain = tmp_path / "openai.pt"
    torch.save(openai_layout_state(), plain)
    with pytest.raises(ValueError, match=r"model: ViT-B-32-quickgelu") as e:
        check_checkpoint(spec("ViT-B-32", str(plain)))
    assert "checkpoint_activation: gelu" in str(e.value)  # the way out for LAION GELU weights
    check_checkpoint(spec("ViT-B-32-quickgelu", str(plain)))  # the right model: accepted
    check_checkpoint(spec("ViT-B-32", str(plain), activation="gelu"))  # declared: accepted

    # OpenAI's release keys (the JIT archive's extras) say QuickGELU even under a declared name.
    marked = tmp_path / "openai_release.pt"
    torch.save({**openai_layout_state(), "input_resolution": torch.tensor(224)}, marked)
    with pytest.raises(ValueError, match=r"trained with QuickGELU .*ViT-B-32-quickgelu"):
        check_checkpoint(spec("ViT-B-32", str(marked)))

    # safetensors metadata, and open_clip_config.json beside the file (hub layout), are read.
    gelu = tmp_path / "laion.safetensors"
    save_file(openai_layout_state(), str(gelu), metadata={"quick_gelu": "false"})
    check_checkpoint(spec("ViT-B-32", str(gelu)))
    with pytest.raises(ValueError, match=r"trained with GELU .*set model: ViT-B-32\b"):
        check_checkpoint(spec("ViT-B-32-quickgelu", str(gelu)))
    hub = tmp_path / "hub"
    hub.mkdir()
    torch.save(openai_layout_state(), hub / "open_clip_pytorch_model.bin")
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    with pytest.raises(ValueError, match=r"open_clip_config.json .*ViT-B-32-quickgelu"):
        check_checkpoint(spec("ViT-B-32", str(hub / "open_clip_pytorch_model.bin")))
    with pytest.raises(ValueError, match=r"ViT-B-32-quickgelu"):  # the folder itself
        check_checkpoint(spec("ViT-B-32", str(hub)))
    got = check_checkpoint(spec("ViT-B-32-quickgelu", str(hub)))
    assert got.path.endswith("open_clip_pytorch_model.bin")

    # OpenAI's TorchScript release is never executed: refused, naming the QuickGELU model.
    jit = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(jit))
    with pytest.raises(ValueError, match=r"TorchScript .*ViT-B-32-quickgelu"):
        check_checkpoint(spec("ViT-B-32", str(jit)))


def test_clip_weights_from_s3_strict_and_activation_checked(s3_server, s3_bucket, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """A tiny QuickGELU CLIP saved in OpenAI's layout (no marker), put on S3: the QuickGELU
    architecture loads it exactly; the same architecture with GELU is refused; a missing name is
    an error naming it."""
    monkeypatch.setenv(fs.CACHE_ENV, str(tmp_path / "cache"))
    quick = {**TINY, "quick_gelu": True}
    torch.manual_seed(1)
    model, *_ = build_clip(spec("tiny_quick", "", quick))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(tmp_path / "w.pt"), s3_bucket, "clip/w.pt")
    uri = f"s3://{s3_bucket}/clip/w.pt"

    loaded, *_ = build_clip(spec("tiny_quick", uri, quick))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert (
        check_checkpoint(spec("tiny_quick", uri, quick)).sha256
        == fs.file_digest(str(tmp_path / "w.pt"))[1]
    )
    with pytest.raises(ValueError, match=r'"quick_gelu": true in the model config of tiny_gelu'):
        build_clip(spec("tiny_gelu", uri, TINY))

    del state["ln_final.bias"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['ln_final.bias'\]"):
        build_clip(spec("tiny_quick", str(tmp_path / "broken.pt"), quick))
