"""The CLI surface is a contract (docs and scripts rely on it): pin it."""

import subprocess
import sys

import pytest

from jobs.cli import build_parser, main


def subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_command_surface():
    top = subcommands(build_parser())
    assert list(top) == [
        "data",
        "preprocess",
        "tokenize",
        "train",
        "sample",
        "eval",
        "convert",
        "submit",
    ]
    assert list(subcommands(top["data"])) == ["digits"]
    digits = subcommands(top["data"])["digits"]
    opts = {s for a in digits._actions for s in a.option_strings}
    assert {"--out", "--config"} <= opts


def test_help_is_useful(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "t2i data digits" in text and "RAY_ADDRESS" in text and "key.sub=value" in text
    with pytest.raises(SystemExit):
        main(["data", "digits", "--help"])
    text = capsys.readouterr().out
    assert "--out" in text and "mismatch_fraction" in text


def test_config_errors_are_one_line(capsys, tmp_path):
    assert main(["data", "digits", "--out", str(tmp_path), "image_sise=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2i data: error: command line: unknown key 'image_sise'")
    assert main(["data", "digits"]) == 2
    assert "missing required value 'out'" in capsys.readouterr().err


def test_console_script_builds_digits(tmp_path):
    """The installed `t2i` script, as a user runs it."""
    t2i = __import__("pathlib").Path(sys.executable).with_name("t2i")
    out = tmp_path / "d"
    r = subprocess.run(
        [str(t2i), "data", "digits", "--out", str(out), "image_size=8", "photos=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert all(s in r.stdout for s in ("train=1617", "val=180", "photos=2"))
    assert (out / "manifest.json").exists() and (out / "train" / "digits-00000.tar").exists()
