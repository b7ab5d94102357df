"""`t2i convert --from openai-dvae` against OpenAI's own `dall_e` modules: same codes, same
reconstructions; wrong layouts and pickled modules are refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from jobs.cli import main
from trainer.pretrained.image_tokenizers import load_image_tokenizer


@pytest.fixture
def openai_pair(tmp_path, one_thread):
    """OpenAI modules with small, non-default, asymmetric sizes and random weights, saved as the
    state dicts a user would write."""
    from dall_e import Decoder, Encoder

    torch.manual_seed(0)
    enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = Decoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=512)
    for module in (enc, dec):  # OpenAI initialises biases to 0: make them count (except the
        for name, p in module.named_parameters():  # code logits', which would pick one code)
            if name.endswith(".b") and name != "blocks.output.conv.b":
                p.data.normal_(std=0.01)
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    torch.save(dec.state_dict(), tmp_path / "dec.pt")
    return enc, dec, tmp_path


def convert(tmp_path, enc: str, dec: str, out: str = "out") -> int:
    return main(
        ["convert", "--from", "openai-dvae", "--encoder", str(tmp_path / enc),
         "--decoder", str(tmp_path / dec), "--out", str(tmp_path / out)]
    )  # fmt: skip


def test_converted_openai_dvae_matches_the_dall_e_modules(openai_pair):
    from dall_e import map_pixels, unmap_pixels

    enc, dec, tmp_path = openai_pair
    assert convert(tmp_path, "enc.pt", "dec.pt") == 0
    tok = load_image_tokenizer(str(tmp_path / "out"))
    assert (tok.kind, tok.downsample, tok.vocab_size) == ("dvae", 8, 512)
    assert tok.cfg.n_blk_per_group == 1 and tok.cfg.dec_n_blk == 2 and tok.cfg.n_init == 32
    assert len(tok.fingerprint) == 64

    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        logits = enc(map_pixels(images))
        codes = logits.argmax(1)
        one_hot = torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float()
        recon = unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
    assert codes.unique().numel() > 1  # the comparison is not trivially satisfied
    assert torch.equal(tok.encode(images), codes)
    torch.testing.assert_close(tok.logits(images), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.decode(codes), recon, rtol=1e-5, atol=1e-5)


def test_safetensors_inputs_convert_too(openai_pair):
    from safetensors.torch import save_file

    enc, dec, tmp_path = openai_pair
    save_file(enc.state_dict(), tmp_path / "enc.safetensors")
    save_file(dec.state_dict(), tmp_path / "dec.safetensors")
    assert convert(tmp_path, "enc.safetensors", "dec.safetensors", "st") == 0
    assert convert(tmp_path, "enc.pt", "dec.pt", "pt") == 0
    a = load_image_tokenizer(str(tmp_path / "st"))
    b = load_image_tokenizer(str(tmp_path / "pt"))
    assert a.fingerprint == b.fingerprint


def test_wrong_layout_names_the_key(openai_pair, capsys):
    enc, dec, tmp_path = openai_pair
    sd = enc.state_dict()
    sd["blocks.group_1.block_1.res_path.conv_9.w"] = sd.pop(
        "blocks.group_1.block_1.res_path.conv_4.w"
    )
    torch.save(sd, tmp_path / "renamed.pt")
    assert convert(tmp_path, "renamed.pt", "dec.pt") == 2
    err = capsys.readouterr().err
    assert "'blocks.group_1.block_1.res_path.conv_4.w'" in err and "missing" in err
    assert "conv_9" in err and "unexpected" in err

    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}  # a prefixed (other) layout
    torch.save(sd, tmp_path / "prefixed.pt")
    assert convert(tmp_path, "prefixed.pt", "dec.pt") == 2
    assert "missing key 'blocks.input.w'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_encoder_and_decoder_of_different_models_are_refused(openai_pair, capsys):
    from dall_e import Decoder

    _, _, tmp_path = openai_pair
    torch.save(Decoder(n_hid=64, n_blk_per_group=1, vocab_size=1024).state_dict(), tmp_path / "d")
    assert convert(tmp_path, "enc.pt", "d") == 2
    assert "not a pair" in capsys.readouterr().err


def test_pickled_module_is_refused_not_unpickled(openai_pair, capsys):
    enc, _, tmp_path = openai_pair
    torch.save(enc, tmp_path / "encoder.pkl")  # what OpenAI published: a whole pickled module
    assert convert(tmp_path, "encoder.pkl", "dec.pt") == 2
    err = capsys.readouterr().err
    assert "never unpickle" in err and "state_dict()" in err


def test_cli_checks_arguments_and_dispatches_taming(tmp_path, monkeypatch, capsys):
    assert main(["convert", "--from", "openai-dvae", "--out", str(tmp_path)]) == 2
    assert "needs --encoder and --decoder" in capsys.readouterr().err
    assert main(["convert", "--from", "taming-vqgan", "--ckpt", "x", "--out", "o"]) == 2
    assert "needs --config" in capsys.readouterr().err

    import trainer.pretrained.converters as tokenizers

    calls = []
    monkeypatch.setattr(
        tokenizers, "convert_taming_vqgan", lambda *a, **kw: calls.append((a, kw)) or {"ok": 1}
    )
    argv = ["convert", "--from", "taming-vqgan", "--ckpt", "m.ckpt", "--config", "m.yaml"]
    assert main([*argv, "--out", "o", "--keep-loss"]) == 0
    assert calls == [(("m.ckpt", "m.yaml", "o"), {"keep_loss": True})]
